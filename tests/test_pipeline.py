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
from posjax.training import loop

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


def test_build_examples_counts_tokens_and_examples():
  class Tok:  # whitespace "tokenizer": one id per word
    def encode_batch(self, docs, add_special_tokens):
      return [type('E', (), {'ids': [5 + len(w) for w in d.split()]}) for d in docs]
  docs = ['a ' * 70, 'b ' * 9, 'c ' * 5, 'd ' * 33]  # 70 -> 30+30+10; 9; 5 dropped; 33 -> 30 + 3 (tail dropped)
  ex = pipeline.build_examples(docs, Tok(), 32, SPECIALS)
  assert ex.tokens == 117 and len(ex.fields['ids']) == 5
  assert ex.long_documents == 2 and ex.short_tails == 2
  assert '5 examples of 32 tokens per epoch' in ex.summary(32)


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
  last = loop.train_and_evaluate(c, str(tmp_path / 'run'))
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
  last = loop.train_and_evaluate(c, str(tmp_path / 'run'))
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
  loop.train_and_evaluate(c, str(tmp_path))
  shutil.rmtree(tmp_path / 'checkpoints' / '10')
  shutil.rmtree(tmp_path / 'checkpoints' / '5' / 'data')
  caplog.set_level('INFO')
  loop.train_and_evaluate(c, str(tmp_path))
  assert 'resumed from the checkpoint at step 5' in caplog.text
  assert 'holds no data iterator state for process_0-of-1.json' in caplog.text
  assert 'unreadable' not in caplog.text
