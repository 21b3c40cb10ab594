"""Length extrapolation: MLM loss and accuracy of a pretrained model at multiples of its training length.

    python -m posjax.analysis.extrapolation WORKDIR [WORKDIR ...] [--multiples=1,2,4] [--files=GLOB]

Each WORKDIR is a posjax pretraining run (typically one per attention variant). The text is the run's own
held-out documents (the same split the trainer evaluates on) or `--files`, tokenized with the run's
tokenizer, concatenated with [SEP] between documents and cut into [CLS] chunk [SEP] rows of exactly L tokens,
so every position up to L carries text. Masking is BERT's (15%, 80/10/10) from a seeded stream. ELECTRA and
ConvBERT runs are scored with their generator (the part with an MLM head).

Absolute position embeddings (learned or sinusoidal) have a table of `max_position_embeddings` rows: lengths
past it get a row saying so instead of a number. Lengths past the training length but within the table use
rows that pretraining never updated (learned) -- that is the extrapolation being measured.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from posjax.attention import registry
from posjax.config import ModelConfig
from posjax.data import corpus as corpus_lib
from posjax.data import pretrain
from posjax.data import tokenizer as tokenizer_lib
from posjax.errors import ConfigError
from posjax import pretrained
from posjax.models import Bert
from posjax.training import host_memory, metrics, objectives


def rows_of_length(stream: np.ndarray, length: int, specials: pretrain.Specials, max_rows: int) -> np.ndarray:
  """[CLS] chunk [SEP] rows of exactly `length` tokens cut from one token stream (at most `max_rows`)."""
  body = length - 2
  n = min(len(stream) // body, max_rows)
  chunks = stream[:n * body].reshape(n, body)
  cls = np.full((n, 1), specials.cls, np.int32)
  sep = np.full((n, 1), specials.sep, np.int32)
  return np.concatenate([cls, chunks, sep], axis=1).astype(np.int32)


def rows_wanted(length: int, max_tokens: int) -> int:
  """Rows evaluated at `length`: max_tokens worth, and at least one."""
  return max(1, max_tokens // length)


def eval_length(multiple: float, train_len: int) -> int:
  return int(round(multiple * train_len))


def tokens_needed(multiples, train_len: int, max_tokens: int) -> int:
  """Stream tokens `evaluate_model` reads at most (a length past max_tokens still takes one row)."""
  return max(rows_wanted(n, max_tokens) * (n - 2) for n in (eval_length(m, train_len) for m in multiples))


def mlm_scores(cfg: ModelConfig, params, batch) -> tuple[float, float, float]:
  """(summed cross-entropy, correct predictions, predictions) over a masked batch."""
  out = Bert(cfg).apply({'params': params}, batch['ids'], batch['mask'], mlm_positions_BxP=batch['positions'],
                        only_predicted_rows=not cfg.discriminator_head)
  logits = out['mlm_logits_BxLxV'].astype(jnp.float32)
  loss, acc = objectives.mlm_loss(logits, batch['labels'], batch['weights'])
  n = batch['weights'].sum()
  return loss * n, acc * n, n


def position_limit(cfg: ModelConfig) -> tuple[int | None, str]:
  """(the longest length the model can run at, or None for no limit; the reason)."""
  pe = registry.parse(cfg.attention).position_embedding
  if pe is None or pe.name == 'none':
    return None, ''
  return cfg.max_position_embeddings, (f'cannot run: the {pe.name} position embedding has '
                                       f'{cfg.max_position_embeddings} rows (max_position_embeddings)')


def evaluate_model(cfg: ModelConfig, params, stream: np.ndarray, specials: pretrain.Specials, train_len: int,
                   multiples=(1, 2, 4), max_tokens: int = 65536, batch_tokens: int = 4096, seed: int = 0,
                   label: str = '', vocab_size: int | None = None) -> list[dict]:
  """One result row per multiple of `train_len`: loss and accuracy of the MLM head on masked tokens.
  `vocab_size`: the tokenizer's, where BERT's random replacements come from (default: the model's)."""
  limit, why = position_limit(cfg)
  score = jax.jit(functools.partial(mlm_scores, cfg))
  rows = []
  # Work grows with the tokens scored; the first length's time includes compiling, so the rate starts after it.
  progress, done_tokens = None, 0
  for m in multiples:
    length = eval_length(m, train_len)
    row = {'model': label, 'attention': cfg.attention, 'multiple': m, 'length': length}
    if limit is not None and length > limit:
      rows.append({**row, 'loss': None, 'accuracy': None, 'tokens': 0, 'note': why})
      continue
    ids = rows_of_length(stream, length, specials, rows_wanted(length, max_tokens))
    if not len(ids):
      rows.append({**row, 'loss': None, 'accuracy': None, 'tokens': 0,
                   'note': f'the text has fewer than {length} tokens'})
      continue
    batch = pretrain.mask_tokens(ids, np.random.default_rng([seed, length]), specials,
                                 vocab_size or cfg.vocab_size)
    per = max(1, batch_tokens // length)
    total = np.zeros(3)
    for s in range(0, len(ids), per):
      part = {k: v[s:s + per] for k, v in batch.items()}
      if len(part['ids']) < per:  # pad with zero-weight rows: one compilation per length
        pad = per - len(part['ids'])
        part = {k: np.concatenate([v, np.repeat(v[:1], pad, 0) * (0 if k == 'weights' else 1)]) for k, v in
                part.items()}
      total += np.asarray(jax.device_get(score(params, part)), np.float64)
    note = ''
    if limit is not None and length > train_len:
      note = (f'positions {train_len}-{length - 1} were never seen in pretraining '
              f'({registry.parse(cfg.attention).position_embedding.name} embedding)')
    rows.append({**row, 'loss': total[0] / total[2], 'accuracy': total[1] / total[2], 'tokens': int(total[2]),
                 'note': note})
    done_tokens += len(ids) * length
    left = sum(rows_wanted(eval_length(x, train_len), max_tokens) * eval_length(x, train_len)
               for x in multiples[len(rows):])
    if progress is None:
      progress = metrics.Progress(done_tokens + left, done_tokens, unit='tokens')
      rate = ''
    else:
      rate = f' ({progress.update(done_tokens)})'
    print(f'{label or cfg.attention}: length {length} ({len(rows)}/{len(multiples)}) loss {rows[-1]["loss"]:.4f}'
          f'{rate}', file=sys.stderr, flush=True)
  return rows


def held_out_text(config: dict, workdir: str, files: str = ''):
  """The held-out documents of the run in `workdir` trained with `config` (the trainer's own source and eval
  split), or those of `files`: an iterator, read record by record."""
  if files:
    return iter(corpus_lib.read_files(files).documents)
  from posjax.data import sources  # pylint: disable=g-import-not-at-top
  from posjax.training import defaults  # pylint: disable=g-import-not-at-top
  data = defaults.pretraining_config(model_type='bert', objective='mlm', small=True,
                                     model=defaults.model_fields()).data
  data.update({k: v for k, v in config.get('data', {}).items() if k in data})  # runs of older code lack some
  documents = sources.open_documents(data, workdir)
  # Runs from before data.seed drew their held-out documents with the model's seed.
  held_out = sources.held_out(len(documents), config.get('data', {}).get('seed', config.get('seed', 0)),
                              data.eval_fraction)
  return documents.iter_texts(np.flatnonzero(held_out), collections.Counter())


def token_stream(tok, docs, sep: int, max_tokens: int, block: int = 256) -> np.ndarray:
  """The documents' tokens, each followed by [SEP], as one int32 stream of at least `max_tokens` tokens where
  the documents have that many, tokenised only until then: the evaluation reads only the start of the stream,
  and a catalog corpus's held-out split can be gigabytes of text."""
  parts, n = [], 0
  docs = iter(docs)
  while n < max_tokens:
    texts = list(itertools.islice(docs, block))
    if not texts:
      break
    for e in tok.encode_batch(texts, add_special_tokens=False):
      parts.append(np.asarray(e.ids + [sep], np.int32))
      n += len(parts[-1])
  return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def evaluate_workdir(workdir: str, multiples=(1, 2, 4), files: str = '', max_tokens: int = 65536,
                     seed: int = 0) -> list[dict]:
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ConfigError(f'{workdir!r} is not a posjax pretraining workdir (no checkpoints/)')
  pre = pretrained.load(workdir)
  cfg, params = pre.mlm
  if not pre.seq_len:
    raise ConfigError(f'{workdir}: its checkpoint does not record data.seq_len (the training length)')
  tok = pre.tokenizer
  specials = pretrain.Specials.from_tokenizer_ids(tokenizer_lib.special_ids(tok))
  stream = token_stream(tok, held_out_text(pre.run_config, workdir, files), specials.sep,
                        tokens_needed(multiples, pre.seq_len, max_tokens))
  cfg = dataclasses.replace(cfg, hidden_dropout=0.0, attention_dropout=0.0)
  return evaluate_model(cfg, params, stream, specials, pre.seq_len, multiples, max_tokens, seed=seed,
                        label=os.path.basename(os.path.normpath(workdir)), vocab_size=tok.get_vocab_size())


def format_table(rows: list[dict]) -> str:
  lines = ['| model | attention | length | x train | MLM loss | MLM accuracy | masked tokens | note |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    loss = f'{r["loss"]:.4f}' if r['loss'] is not None else '-'
    acc = f'{r["accuracy"]:.4f}' if r['accuracy'] is not None else '-'
    lines.append(f'| {r["model"]} | `{r["attention"]}` | {r["length"]} | {r["multiple"]:g} | {loss} | {acc} | '
                 f'{r["tokens"]} | {r["note"]} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdirs', nargs='+', help='posjax pretraining workdirs (one per attention variant)')
  parser.add_argument('--multiples', default='1,2,4', help='lengths as multiples of the training length')
  parser.add_argument('--files', default='', help='evaluation text (glob); default: each run\'s held-out docs')
  parser.add_argument('--max_tokens', type=int, default=65536, help='tokens evaluated per length')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--output', default='', help='also write the rows as JSON here')
  args = parser.parse_args(argv)
  try:
    multiples = [float(m) for m in args.multiples.split(',') if m.strip()]
  except ValueError:
    print(f'error: --multiples {args.multiples!r} must be comma-separated numbers', file=sys.stderr)
    return 2
  print(host_memory.keep_freed_memory(), file=sys.stderr, flush=True)
  rows = []
  try:
    for w in args.workdirs:
      rows.extend(evaluate_workdir(w, multiples, args.files, args.max_tokens, args.seed))
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_table(rows))
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(rows, f, indent=2)
  return 0


if __name__ == '__main__':
  from posjax import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_tpu_probe()
  sys.exit(main())
