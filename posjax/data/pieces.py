"""Documents -> token pieces on disk: tokenised once, in batches, by a grain pipeline, then read by random access.

    stats = pieces.prepare(documents, held_out, tokenizer, body, directory)  # cached: reused when present
    train = pieces.Pieces(directory, 'train')
    train[i]  # the int32 tokens of piece i (at most `body`, at least pretrain.MIN_CHUNK of them)

Pretraining reads documents record by record from a prepared tfds dataset, so a corpus of any size (wikipedia,
c4) is never held in memory: blocks of records are read, cleaned and tokenised (one `encode_batch` per block,
parallel in HF tokenizers' Rust code, blocks overlapped in grain's read threads), cut into pieces of `body`
tokens (`pretrain.chunk`) and appended to flat token files with an offset index, one set of files per split.
Examples are made from the pieces as the training stream reads them (posjax/data/pipeline.py), with fresh
sentence pairs and masks every epoch. The files live in the data dir under a name that digests everything they
depend on (the dataset, the held-out split, the tokenizer, the piece length), are written to a temporary
directory and renamed into place, so concurrent runs never see half a table, and are memory-mapped, so worker
processes and runs on one host share the page cache.

On several hosts the tokenising is shared: each process writes its contiguous share of the blocks as a part
(`write_part`), and process 0 concatenates the parts in order (`join`), which gives the same bytes as one
process writing them all. Parts are kept until the join, so a pod preempted while tokenising goes on from the
parts it finished when restarted on as many hosts (parts for another host count stay behind: delete
DIGEST.parts-of-N when no run is using them).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile

import grain
import numpy as np

from posjax.data import corpus
from posjax.data import pretrain
from posjax import locks
from posjax.errors import ConfigError

FORMAT = 1  # of the files below; part of the cache name
SPLITS = ('train', 'eval')
BLOCK = 1024  # records per tokenizer call


def cache_dir(data_dir: str, documents, held_out_seed: int, eval_fraction: float, tokenizer, body: int) -> str:
  h = hashlib.sha256(json.dumps([FORMAT, documents.identity, len(documents), held_out_seed, eval_fraction,
                                 body]).encode())
  h.update(tokenizer.to_str().encode())
  return os.path.join(data_dir, 'posjax_pieces', h.hexdigest()[:24])


class Pieces:
  """One split's pieces: `len()`, `[i]` (int32 tokens), `document(i)` (the record index it came from).
  Pickles as its path (grain worker processes map the files themselves)."""

  def __init__(self, directory: str, split: str, vocab_size: int | None = None):
    """`vocab_size`: every token id must be below it (checked once, here: a damaged token file would otherwise
    surface as a non-finite loss many steps later)."""
    self.directory, self.split = directory, split
    meta = read_meta(directory)
    try:
      self.count, self.body, self.dtype = meta['pieces'][split], meta['body'], np.dtype(meta['dtype'])
      self._open()
    except (KeyError, TypeError, OSError) as e:
      raise _damaged(directory, f'{type(e).__name__}: {e}') from None
    # Files are renamed into place whole, so this only fails if something else changed them.
    if (len(self.offsets) != self.count + 1 or len(self.documents) != self.count or
        (self.count and self.offsets[-1] != len(self.tokens))):
      raise _damaged(directory, f'{split} files do not agree with meta.json')
    if vocab_size is not None:
      for start in range(0, len(self.tokens), 1 << 26):
        block = self.tokens[start:start + (1 << 26)]
        if len(block) and (int(block.max()) >= vocab_size or int(block.min()) < 0):
          bad = start + int(np.flatnonzero((block >= vocab_size) | (block < 0))[0])
          raise _damaged(directory, f'{split}.tokens holds id {int(self.tokens[bad])} at position {bad}, outside '
                         f'the vocabulary of {vocab_size} tokens')

  def _open(self):
    self.tokens = _map(os.path.join(self.directory, f'{self.split}.tokens'), self.dtype)
    self.offsets = _map(os.path.join(self.directory, f'{self.split}.offsets'), np.int64)
    self.documents = _map(os.path.join(self.directory, f'{self.split}.documents'), np.int64)

  def __getstate__(self):
    return {'directory': self.directory, 'split': self.split, 'count': self.count, 'body': self.body,
            'dtype': self.dtype.str}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self.dtype = np.dtype(self.dtype)
    self._open()

  def __len__(self):
    return self.count

  def __getitem__(self, i):
    return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]], np.int32)

  def document(self, i) -> int:
    return int(self.documents[i])


def _damaged(directory: str, why: str) -> ConfigError:
  return ConfigError(f'data.data_dir: the tokenised pieces in {directory} are damaged ({why}); delete that '
                     'directory and they are made again')


def read_meta(directory: str) -> dict:
  try:
    with open(os.path.join(directory, 'meta.json')) as f:
      return json.load(f)
  except ValueError as e:
    raise _damaged(directory, f'meta.json: {e}') from None


def _map(path: str, dtype) -> np.ndarray:
  n = os.path.getsize(path) // np.dtype(dtype).itemsize
  return np.memmap(path, dtype, 'r', shape=(n,)) if n else np.zeros(0, dtype)  # mmap cannot map empty files


class _Block:
  """Records `i*BLOCK ..` -> cleaned texts -> one tokenizer call -> pieces, per split."""

  def __init__(self, documents, held_out, tokenizer, body: int, dtype):
    self.documents, self.held_out, self.tokenizer, self.body, self.dtype = (documents, held_out, tokenizer,
                                                                           body, dtype)

  def __call__(self, block: int):
    skipped = collections.Counter()
    idx = np.arange(block * BLOCK, min(len(self.documents), (block + 1) * BLOCK))
    texts = self.documents.texts(idx, skipped)
    encoded = self.tokenizer.encode_batch([t for _, t in texts], add_special_tokens=False) if texts else []
    out = {s: {'tokens': [], 'lengths': [], 'documents': [], 'docs': 0, 'doc_tokens': 0, 'long': 0,
               'short_tails': 0} for s in SPLITS}
    for (i, _), e in zip(texts, encoded):
      o = out['eval' if self.held_out[i] else 'train']
      ids = np.asarray(e.ids, np.int32)
      pieces = pretrain.chunk(ids, self.body)
      tail = len(ids) % self.body
      o['docs'] += 1
      o['doc_tokens'] += len(ids)
      o['long'] += len(ids) > self.body
      o['short_tails'] += 0 < tail < pretrain.MIN_CHUNK
      o['tokens'].extend(pieces)
      o['lengths'].extend(len(p) for p in pieces)
      o['documents'].extend([i] * len(pieces))
    for o in out.values():
      o['tokens'] = (np.concatenate(o['tokens']) if o['tokens'] else np.zeros(0, np.int32)).astype(self.dtype)
    return out, skipped


def exists(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, 'meta.json'))


def prepare(documents, held_out: np.ndarray, tokenizer, body: int, directory: str,
            threads: int = 4) -> dict:
  """Writes the pieces of `documents` (held-out records to split `eval`, the rest to `train`) to `directory`,
  unless they are there already; returns the statistics (also in `directory`/meta.json). One process does all
  the work; a multi-host run shares it with `write_part` and `join`."""
  if exists(directory):
    return read_meta(directory)
  with locks.locked(directory + '.lock'):  # a concurrent run of the same table waits, then uses it
    if not exists(directory):
      tmp = _tmp_beside(directory)
      try:
        part = _write(documents, held_out, tokenizer, body, tmp, range(_blocks(documents)), threads)
        _finish(tmp, [tmp], [part])
        _publish(tmp, directory)
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
  return read_meta(directory)


def parts_dir(directory: str, count: int) -> str:
  return f'{directory}.parts-of-{count}'


def share(n: int, index: int, count: int) -> range:
  """Process `index` of `count`'s contiguous share of n blocks."""
  return range(n * index // count, n * (index + 1) // count)


def write_part(documents, held_out: np.ndarray, tokenizer, body: int, directory: str, index: int, count: int,
               threads: int = 4):
  """Process `index` of `count` tokenises its contiguous share of the blocks into parts_dir(directory, count)/
  index; `join` then makes `directory` from all the parts, the same bytes as `prepare` writes.

  A part's bytes depend only on what `directory`'s name digests and on (index, count), so a part already in
  place is used as it is: one left by a run killed after writing it (a restarted run on as many hosts goes on
  from there), or one a concurrent run of the same table wrote."""
  parts = parts_dir(directory, count)
  final = os.path.join(parts, str(index))
  blocks = share(_blocks(documents), index, count)
  if os.path.exists(os.path.join(final, 'part.json')):
    logging.info('process %d of %d: reusing its tokenised part %s', index, count, final)
    return
  try:
    with locks.locked(os.path.join(parts, f'{index}.lock')):  # a concurrent run's same part: wait, reuse it
      if os.path.exists(os.path.join(final, 'part.json')):
        return
      _clear_leftovers(parts, f'.tmp-{index}-', final)
      tmp = tempfile.mkdtemp(prefix=f'.tmp-{index}-', dir=parts)
      try:
        part = _write(documents, held_out, tokenizer, body, tmp, blocks, threads, with_documents_skipped=index == 0)
        with open(os.path.join(tmp, 'part.json'), 'w') as f:
          json.dump(part, f)
        os.rename(tmp, final)
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
  except OSError:
    if exists(directory):  # a concurrent run published the table and removed the parts under us
      return
    raise
  logging.info('process %d of %d tokenised blocks [%d, %d) of %d (%d records each)', index, count, blocks.start,
               blocks.stop, _blocks(documents), BLOCK)


def join(directory: str, count: int) -> dict:
  """Concatenates the `count` parts in order into `directory`, deletes them and returns the statistics."""
  parts = parts_dir(directory, count)
  try:
    with locks.locked(directory + '.lock'):
      if not exists(directory):  # else a concurrent run published the same table first
        dirs = [os.path.join(parts, str(i)) for i in range(count)]
        stats = []
        for d in dirs:
          try:
            with open(os.path.join(d, 'part.json')) as f:
              stats.append(json.load(f))
          except (OSError, ValueError) as e:
            raise ConfigError(f'data.data_dir: tokenised part {d} cannot be read ({type(e).__name__}: {e}); a '
                              'multi-host run needs a data dir every host can see') from None
        tmp = _tmp_beside(directory)
        try:
          _finish(tmp, dirs, stats)
          _publish(tmp, directory)
        finally:
          shutil.rmtree(tmp, ignore_errors=True)
  except (OSError, ConfigError):
    if not exists(directory):
      raise
  shutil.rmtree(parts, ignore_errors=True)
  return read_meta(directory)


def _blocks(documents) -> int:
  return -(-len(documents) // BLOCK)


def _clear_leftovers(parent: str, prefix: str, target: str):
  """Under the target's lock: temporary directories `prefix*` in `parent` (runs killed while writing them) and a
  `target` that was never completed (its meta.json or part.json gone) are deleted; they are caches, remade from
  the corpus."""
  for name in os.listdir(parent) if os.path.isdir(parent) else ():
    if name.startswith(prefix):
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
  if os.path.isdir(target) and not any(os.path.exists(os.path.join(target, f)) for f in ('meta.json', 'part.json')):
    logging.warning('deleting %s: its tokenised pieces are incomplete (no meta.json); making them again', target)
    shutil.rmtree(target)


def _tmp_beside(directory: str) -> str:
  """A temporary directory beside `directory`; call holding directory's lock (stale ones are cleared here)."""
  parent, prefix = os.path.dirname(directory), os.path.basename(directory) + '.tmp-'
  os.makedirs(parent, exist_ok=True)
  _clear_leftovers(parent, prefix, directory)
  return tempfile.mkdtemp(prefix=prefix, dir=parent)


def _publish(tmp: str, directory: str):
  os.rename(tmp, directory)


def _write(documents, held_out, tokenizer, body, out, blocks: range, threads,
           with_documents_skipped: bool = True) -> dict:
  """Tokenises `blocks` into out/{split}.{tokens,lengths,documents}; returns the counts (a JSON dict)."""
  dtype = np.dtype(np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.int32)
  # In order: the read threads tokenise the next blocks while this one is written.
  stream = grain.MapDataset.range(blocks.start, blocks.stop).map(
      _Block(documents, held_out, tokenizer, body, dtype))
  stream = stream.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
  totals = {s: collections.Counter() for s in SPLITS}
  skipped = collections.Counter(documents.skipped if with_documents_skipped else {})
  with contextlib.ExitStack() as stack:
    files = {(s, k): stack.enter_context(open(os.path.join(out, f'{s}.{k}'), 'wb'))
             for s in SPLITS for k in ('tokens', 'lengths', 'documents')}
    for n, (out_block, block_skipped) in enumerate(stream, 1):
      skipped.update(block_skipped)
      for s in SPLITS:
        o = out_block[s]
        files[s, 'tokens'].write(o['tokens'].tobytes())
        files[s, 'lengths'].write(np.asarray(o['lengths'], np.int64).tobytes())
        files[s, 'documents'].write(np.asarray(o['documents'], np.int64).tobytes())
        totals[s].update({k: o[k] for k in ('docs', 'doc_tokens', 'long', 'short_tails')})
      if n % 1000 == 0:
        logging.info('tokenised %d of %d blocks of %d records', n, len(blocks), BLOCK)
  return {'records': len(documents), 'body': body, 'dtype': dtype.str, 'skipped': dict(skipped),
          'totals': {s: dict(totals[s]) for s in SPLITS}}


def _finish(tmp: str, dirs: list[str], parts: list[dict]):
  """The parts' files (in `dirs`, in order) as one set in `tmp`: tokens and documents concatenated, lengths ->
  offsets, and meta.json with the summed statistics. A part already in `tmp` is used in place."""
  for s in SPLITS:
    for k in ('tokens', 'documents'):
      target = os.path.join(tmp, f'{s}.{k}')
      if dirs != [tmp]:
        with open(target, 'wb') as f:
          for d in dirs:
            with open(os.path.join(d, f'{s}.{k}'), 'rb') as src:
              shutil.copyfileobj(src, f, 1 << 24)
  counts = {}
  for s in SPLITS:  # lengths -> offsets, a block at a time (a catalog dataset has billions of pieces)
    total, counts[s] = np.zeros(1, np.int64), 0
    with open(os.path.join(tmp, f'{s}.offsets'), 'wb') as f:
      f.write(total.tobytes())
      for d in dirs:
        lengths = _map(os.path.join(d, f'{s}.lengths'), np.int64)
        counts[s] += len(lengths)
        for start in range(0, len(lengths), 1 << 24):
          ends = total[-1] + np.cumsum(lengths[start:start + (1 << 24)])
          f.write(ends.tobytes())
          total = ends
        del lengths
    if dirs == [tmp]:
      os.remove(os.path.join(tmp, f'{s}.lengths'))
  totals = {s: collections.Counter() for s in SPLITS}
  skipped = collections.Counter()
  for p in parts:
    skipped.update(p['skipped'])
    for s in SPLITS:
      totals[s].update(p['totals'][s])
  stats = {'records': parts[0]['records'], 'pieces': counts, 'body': parts[0]['body'],
           'documents': {s: totals[s]['docs'] for s in SPLITS},
           'tokens': {s: totals[s]['doc_tokens'] for s in SPLITS},
           'long_documents': {s: totals[s]['long'] for s in SPLITS},
           'short_tails': {s: totals[s]['short_tails'] for s in SPLITS},
           'skipped': dict(skipped), 'dtype': parts[0]['dtype']}
  with open(os.path.join(tmp, 'meta.json'), 'w') as f:
    json.dump(stats, f, indent=1)


def summary(stats: dict, seq_len: int) -> str:
  return (f'{stats["records"]} records; train: {stats["documents"]["train"]} documents, '
          f'{stats["tokens"]["train"]} tokens, {stats["pieces"]["train"]} examples of {seq_len} tokens per epoch '
          f'({stats["long_documents"]["train"]} documents longer than a sequence split over several, '
          f'{stats["short_tails"]["train"]} document ends under {pretrain.MIN_CHUNK} tokens dropped); eval: '
          f'{stats["documents"]["eval"]} documents, {stats["pieces"]["eval"]} examples; skipped: '
          f'{corpus.why(stats["skipped"])}')
