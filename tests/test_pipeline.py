"""The grain pipeline: exact resumption, process shards, whole-word masking, statistics, real corpora."""

import gzip
import itertools
import json
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import micro_config, unmask
from posjax.data import pipeline, pretrain, tokenizer
from posjax.training import pretraining

SPECIALS = pretrain.Specials(pad=0, unk=1, cls=2, sep=3, mask=4)


def fields(n=50, l=24, seed=0):
  rng = np.random.default_rng(seed)
  docs = [rng.integers(5, 300, size=rng.integers(10, 60)) for _ in range(n)]
  return {'ids': pretrain.pack(docs, l, SPECIALS)}


MASKING = pipeline.Masking(SPECIALS, vocab_size=300)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k


def test_resumed_iterator_yields_the_same_bytes_through_an_orbax_checkpoint(tmp_path):
  ds = pipeline.train_dataset(fields(), 8, seed=5, masking=MASKING, shard=grain.sharding.NoSharding())
  it = pipeline.iterator(ds)
  take(it, 9)  # past the first epoch (50 examples = 6 batches)
  mngr = ocp.CheckpointManager(str(tmp_path / 'ckpt'))
  mngr.save(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  uninterrupted = take(it, 8)
  fresh = pipeline.iterator(pipeline.train_dataset(fields(), 8, seed=5, masking=MASKING,
                                                   shard=grain.sharding.NoSharding()))
  mngr.restore(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_same(take(fresh, 8), uninterrupted)
  # And the batches are those of random access at the same steps.
  assert_same([ds[s] for s in range(9, 17)], uninterrupted)


def test_two_processes_read_disjoint_halves_of_each_global_batch():
  """Process shards (ShardOptions 0/2 and 1/2, in one process: jax.distributed is not needed for the data
  path) concatenate to the one-process batch, byte for byte, and each resumes on its own."""
  one = pipeline.train_dataset(fields(), 8, seed=1, masking=MASKING, shard=grain.sharding.NoSharding())
  halves = [pipeline.train_dataset(fields(), 8, seed=1, masking=MASKING,
                                   shard=grain.sharding.ShardOptions(i, 2, drop_remainder=True)) for i in (0, 1)]
  for step in range(14):
    a, b = halves[0][step], halves[1][step]
    assert a['ids'].shape == (4, 24)
    assert_same([{k: np.concatenate([a[k], b[k]]) for k in a}], [one[step]])
  its = [pipeline.iterator(h) for h in halves]
  states = []
  for it in its:
    take(it, 5)
    states.append(it.get_state())
  later = [take(it, 4) for it in its]
  for h, state, expected in zip(halves, states, later):
    it = pipeline.iterator(h)
    it.set_state(state)
    assert_same(take(it, 4), expected)


def test_whole_word_masking_masks_whole_words():
  rng = np.random.default_rng(0)
  # ids 5..99 start words, 100..299 continue one; words of 1-3 tokens.
  continuation = np.arange(300) >= 100
  docs = []
  for _ in range(200):
    doc = []
    for _ in range(rng.integers(10, 25)):
      doc += [int(rng.integers(5, 100))] + list(rng.integers(100, 300, size=rng.integers(0, 3)))
    docs.append(doc)
  x = pretrain.pack(docs, 48, SPECIALS)
  out = pretrain.mask_tokens(x, np.random.default_rng(1), SPECIALS, 300, 0.15, 10, continuation)
  np.testing.assert_array_equal(unmask(out), x)
  real = ~np.isin(x, [0, 2, 3])
  target = np.minimum(np.maximum(1, np.rint(real.sum(1) * 0.15)), 10)
  chosen_counts = out['weights'].sum(1)
  assert (chosen_counts <= target).all() and chosen_counts.mean() > 0.8 * target.mean()
  for r in range(len(x)):
    chosen = set(out['positions'][r][out['weights'][r] > 0].tolist())
    for p in chosen:  # a chosen word is chosen from its start to its end
      if continuation[x[r, p]] and p > 1:
        assert p - 1 in chosen, (r, p)
      if p + 1 < x.shape[1] and real[r, p + 1] and continuation[x[r, p + 1]]:
        assert p + 1 in chosen, (r, p)


def test_word_continuations_of_a_wordpiece_vocabulary(tmp_path):
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'play', '##ing', '##s', 'the']
  (tmp_path / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
  cont = pipeline.word_continuations(tokenizer.load(str(tmp_path / 'vocab.txt')))
  assert cont.tolist() == [False] * 6 + [True, True, False]


class ListSource:  # a tfds data source's interface over records in memory
  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitems__(self, idx):
    return [self.records[i] for i in idx]


class WordTok:  # whitespace "tokenizer": one id per word
  def get_vocab_size(self):
    return 100

  def encode_batch(self, docs, add_special_tokens):
    return [type('E', (), {'ids': [5 + len(w) for w in d.split()]}) for d in docs]


def test_pieces_count_tokens_and_examples_and_are_reused(tmp_path):
  import collections
  from posjax.data import pieces, sources
  # Words -> pieces of 30: 70 -> 30+30+10; 9; 5 (dropped); 33 -> 30 (tail of 3 dropped); a record that is not
  # UTF-8; the 6th held out.
  texts = [b'abcdefghi ' * 70, 'abcdefghi ' * 9, 'abcdefghi ' * 5, 'abcdefghi ' * 33, b'\xff\xfe bad' * 9,
           'abcdefghi ' * 12]
  docs = sources.Documents(ListSource([{'text': t} for t in texts]), 'text', 'six records', 'test',
                           collections.Counter({'earlier': 1}))
  held = np.array([False] * 5 + [True])
  stats = pieces.prepare(docs, held, WordTok(), 30, str(tmp_path / 'p'))
  assert stats['tokens'] == {'train': 117, 'eval': 12} and stats['pieces'] == {'train': 5, 'eval': 1}
  assert stats['long_documents']['train'] == 2 and stats['short_tails']['train'] == 2
  assert stats['skipped'] == {'earlier': 1, 'records that are not valid UTF-8': 1}
  assert '5 examples of 32 tokens per epoch' in pieces.summary(stats, 32)
  train = pieces.Pieces(str(tmp_path / 'p'), 'train')
  assert [len(train[i]) for i in range(len(train))] == [30, 30, 10, 9, 30]
  assert [train.document(i) for i in range(len(train))] == [0, 0, 0, 1, 3]
  assert train[0].dtype == np.int32 and (train[0] == 14).all()
  # Reused, not rebuilt: a second call returns the stored statistics without reading a record.
  docs.source.records = None
  assert pieces.prepare(docs, held, WordTok(), 30, str(tmp_path / 'p')) == stats

  # Damaged files are a one-line error saying what to delete, not an index error mid-training.
  from posjax.errors import ConfigError
  tokens = tmp_path / 'p' / 'train.tokens'
  tokens.write_bytes(tokens.read_bytes()[:-4])
  with pytest.raises(ConfigError, match=r'pieces in .*/p are damaged \(train files do not agree'):
    pieces.Pieces(str(tmp_path / 'p'), 'train')
  (tmp_path / 'p' / 'meta.json').write_text('{"pieces": ')
  with pytest.raises(ConfigError, match=r'damaged \(meta.json: .*delete that directory'):
    pieces.prepare(docs, held, WordTok(), 30, str(tmp_path / 'p'))


@pytest.mark.parametrize('count', [1, 3, 7])  # 7 processes for 5 blocks: some tokenise nothing
def test_parts_tokenised_by_several_processes_join_into_the_same_bytes(tmp_path, monkeypatch, count):
  import collections
  from posjax.data import pieces, sources
  monkeypatch.setattr(pieces, 'BLOCK', 4)
  rng = np.random.default_rng(0)
  texts = ['abcdefghi ' * int(n) for n in rng.integers(5, 80, 18)] + [b'\xff\xfe bad' * 9, 'x ' * 40]
  docs = sources.Documents(ListSource([{'text': t} for t in texts]), 'text', '20 records', 'test',
                           collections.Counter({'earlier': 2}))
  held = rng.random(len(texts)) < 0.2
  one = pieces.prepare(docs, held, WordTok(), 30, str(tmp_path / 'one'))
  target = str(tmp_path / 'joined')
  for i in reversed(range(count)):  # any order: each writes its own part
    pieces.write_part(docs, held, WordTok(), 30, target, i, count)
  assert not pieces.exists(target)
  assert pieces.join(target, count) == one
  assert sorted(os.listdir(target)) == sorted(os.listdir(tmp_path / 'one'))
  for name in os.listdir(target):
    assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'joined' / name).read_bytes(), name
  assert not os.path.exists(pieces.parts_dir(target, count))
  assert one['skipped'] == {'earlier': 2, 'records that are not valid UTF-8': 1}
  assert list(itertools.chain(*(pieces.share(5, i, count) for i in range(count)))) == list(range(5))


def test_a_restarted_run_reuses_finished_parts_and_a_published_table_needs_none(tmp_path, monkeypatch):
  import collections
  from posjax.data import pieces, sources
  from posjax.errors import ConfigError

  class Counted(ListSource):
    reads = 0

    def __getitems__(self, idx):
      Counted.reads += len(idx)
      return super().__getitems__(idx)

  monkeypatch.setattr(pieces, 'BLOCK', 2)
  docs = sources.Documents(Counted([{'text': 'abcdefghi ' * (10 + i)} for i in range(9)]), 'text', '9', 'test',
                           collections.Counter())
  held = np.arange(9) == 4
  target = str(tmp_path / 'p')
  with pytest.raises(ConfigError, match=r'part .*/p.parts-of-2/0 cannot be read.*every host can see'):
    pieces.join(target, 2)
  pieces.write_part(docs, held, WordTok(), 30, target, 1, 2)  # blocks 2-4: records 4-8; then the run is killed
  assert Counted.reads == 5
  pieces.write_part(docs, held, WordTok(), 30, target, 1, 2)  # restarted: the part is there, nothing is read
  assert Counted.reads == 5
  pieces.write_part(docs, held, WordTok(), 30, target, 0, 2)
  joined = pieces.join(target, 2)
  assert joined == pieces.prepare(docs, held, WordTok(), 30, str(tmp_path / 'one'))
  # A concurrent run of the same table that finds it published (and no parts) goes on without error.
  assert pieces.join(target, 3) == joined


def test_pretraining_on_imdb_unlabelled_reviews(tmp_path, shared_data, caplog):
  """A slice of the real unlabelled IMDB reviews through the local corpus builder; `<br />`s counted."""
  path = os.path.join(shared_data, 'imdb', 'imdb_unsup.jsonl.gz')
  if not os.path.exists(path):
    pytest.skip(f'{path} is absent')
  with gzip.open(path, 'rt') as f, gzip.open(tmp_path / 'slice.jsonl.gz', 'wt') as out:
    out.writelines(itertools.islice(f, 400))
  caplog.set_level('INFO')
  c = micro_config(num_train_steps=30, eval_every=30, checkpoint_every=30, **{
      'data.source': 'files', 'data.files': str(tmp_path / 'slice.jsonl.gz'), 'data.whole_word_masking': True})
  last = pretraining.train_and_evaluate(c, str(tmp_path / 'run'))
  rows = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl') if '"loss"' in l]
  assert rows[-1]['loss'] < rows[0]['loss'] - 0.5, rows
  assert np.isfinite(last['eval_loss'])
  assert 'documents with HTML tags removed (kept)' in caplog.text
  assert 'examples of 32 tokens per epoch' in caplog.text


def test_pretraining_on_a_catalog_dataset_prepared_from_local_files(tmp_path):
  from posjax.data import prepare
  from test_sources import write_tiny_reviews
  manual = write_tiny_reviews(tmp_path, n=120)
  prepare.prepare_tfds('tiny_reviews', str(tmp_path / 'tfds'), str(manual), str(tmp_path / 'tiny_reviews.py'))
  c = micro_config(num_train_steps=10, eval_every=10, checkpoint_every=10, **{
      'data.source': 'tfds', 'data.tfds_name': 'tiny_reviews', 'data.data_dir': str(tmp_path / 'tfds')})
  last = pretraining.train_and_evaluate(c, str(tmp_path / 'run'))
  assert np.isfinite(last['loss']) and np.isfinite(last['eval_loss'])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume():
  ds = pipeline.train_dataset(fields(), 8, seed=2, masking=MASKING, shard=grain.sharding.NoSharding())
  it = pipeline.iterator(ds, worker_count=2)
  take(it, 5)
  state = it.get_state()
  later = take(it, 6)
  assert_same(later, [ds[s] for s in range(5, 11)])
  again = pipeline.iterator(ds, worker_count=2)
  again.set_state(state)
  assert_same(take(again, 6), later)


def test_checkpoint_without_data_state_still_resumes(tmp_path, caplog):
  """A checkpoint of older code (or of another number of processes) has no iterator state for this process:
  its train state is used all the same, with a warning, not skipped as unreadable."""
  import shutil
  c = micro_config(num_train_steps=10, checkpoint_every=5, eval_every=10)
  pretraining.train_and_evaluate(c, str(tmp_path))
  shutil.rmtree(tmp_path / 'checkpoints' / '10')
  shutil.rmtree(tmp_path / 'checkpoints' / '5' / 'data')
  caplog.set_level('INFO')
  pretraining.train_and_evaluate(c, str(tmp_path))
  assert 'resumed from the checkpoint at step 5' in caplog.text
  assert 'holds no data iterator state for process_0-of-1.json' in caplog.text
  assert 'unreadable' not in caplog.text


def _free_port():
  import socket
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


def _run_workers(runs, tmp_path, tok, extra_env=None, timeout=300):
  """{run name: [(num_processes, process_id, port)]} -> {(name, id): (returncode, log)}."""
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'OMPI_', 'JAX_COORDINATOR'))}
  env.update(extra_env or {})
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pipeline_worker.py')
  procs = [(name, i, subprocess.Popen([sys.executable, worker, str(n), str(i), str(p), str(tmp_path / name),
                                        str(tmp_path / f'{name}{i}.npz'), tok], env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
           for name, args in runs.items() for n, i, p in args]
  out = {}
  try:
    for name, i, proc in procs:
      log, _ = proc.communicate(timeout=timeout)
      out[name, i] = proc.returncode, log
  finally:
    for _, _, proc in procs:
      if proc.poll() is None:
        proc.kill()
  return out


def _worker_tokenizer(tmp_path):
  from posjax.data import corpus
  tokenizer.save(tokenizer.train_wordpiece(corpus.load('', 'text').documents[:300], 300), str(tmp_path))
  return str(tmp_path / 'tokenizer.json')


def test_a_process_failing_to_tokenise_stops_every_process_with_a_clear_error(tmp_path):
  """No process waits for ever at a barrier for one that has failed: all exit, each saying what happened."""
  port = _free_port()
  out = _run_workers({'two': [(2, i, port) for i in range(2)]}, tmp_path, _worker_tokenizer(tmp_path),
                     {'POSJAX_TEST_FAILING_PROCESS': '1'}, timeout=120)
  (code0, log0), (code1, log1) = out['two', 0], out['two', 1]
  assert code1 != 0 and 'no space left on device (test)' in log1, log1[-3000:]
  assert code0 != 0 and 'tokenising its share of the corpus failed on process(es) 1' in log0, log0[-3000:]


def test_two_processes_read_their_halves_of_the_global_batches_and_resume(tmp_path):
  """jax.distributed with 2 CPU processes: each tokenises half of the corpus and reads its half of every global
  batch (NSP pairs and masks included) of a one-process run over the same pieces, and a process's iterator
  restored from a saved state goes on with exactly the batches it would have read."""
  port = _free_port()
  out = _run_workers({'two': [(2, i, port) for i in range(2)], 'one': [(1, 0, 0)]}, tmp_path,
                     _worker_tokenizer(tmp_path))
  for code, log in out.values():
    assert code == 0, log[-4000:]
  logs = {k: log for k, (_, log) in out.items()}
  # The default corpus is two blocks of records: each process tokenised one of them.
  assert 'process 0 of 2 tokenised blocks [0, 1) of 2' in logs['two', 0], logs['two', 0][-3000:]
  assert 'process 1 of 2 tokenised blocks [1, 2) of 2' in logs['two', 1], logs['two', 1][-3000:]
  halves = [np.load(tmp_path / f'two{i}.npz') for i in range(2)]
  whole = np.load(tmp_path / 'one0.npz')
  assert [int(h['process_count']) for h in halves] == [2, 2] and int(whole['process_count']) == 1
  keys = [k for k in whole.files if k.endswith('_0') and not k.startswith('resumed')]
  assert {k[:-2] for k in keys} >= {'ids', 'positions', 'labels', 'type_ids', 'sentence_labels'}
  for s in range(6):
    for k in (k[:-2] for k in keys):
      a, b, w = halves[0][f'{k}_{s}'], halves[1][f'{k}_{s}'], whole[f'{k}_{s}']
      assert len(a) == len(b) == len(w) // 2
      assert np.concatenate([a, b]).tobytes() == w.tobytes(), (k, s)
      if s >= 3:
        for h in halves + [whole]:
          assert h[f'resumed_{k}_{s}'].tobytes() == h[f'{k}_{s}'].tobytes(), (k, s)


@pytest.mark.parametrize('task', [None, 'nsp', 'sop'])
@pytest.mark.parametrize('max_predictions', [0, 7])
def test_batch_spec_describes_the_batches_train_dataset_makes(task, max_predictions):
  from helpers import ListPieces  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  docs = [rng.integers(5, 300, size=rng.integers(20, 60)) for _ in range(12)]
  examples = pipeline.PieceExamples(ListPieces(docs, pretrain.body_length(24, task)), 24, SPECIALS, task)
  masking = pipeline.Masking(SPECIALS, 300, 0.15, max_predictions)
  batch = pipeline.train_dataset(examples, 8, 0, masking, grain.sharding.NoSharding())[0]
  spec = pipeline.batch_spec(8, 24, task, masking)
  assert spec == {k: (v.shape, v.dtype) for k, v in batch.items()}
