"""Corpus reading, tokenizer, packing and BERT masking."""

import gzip
import json

import grain
import numpy as np
import pytest

from helpers import ListPieces, unmask
from posjax.data import corpus, pipeline, pretrain, tokenizer
from posjax.errors import ConfigError

SPECIALS = pretrain.Specials(pad=0, unk=1, cls=2, sep=3, mask=4)


def packed(n=64, l=32, seed=0):
  rng = np.random.default_rng(seed)
  docs = [rng.integers(5, 500, size=rng.integers(10, 120)) for _ in range(n)]
  return pretrain.pack(docs, l, SPECIALS)


def test_pack_frames_each_chunk_and_never_crosses_documents():
  docs = [np.arange(100, 100 + 70), np.arange(500, 500 + 9), np.arange(900, 900 + 5)]
  x = pretrain.pack(docs, 32, SPECIALS)
  # 70 tokens -> 30 + 30 + 10; 9 -> 9; 5 (< 8) dropped.
  assert x.shape == (4, 32)
  assert (x[:, 0] == SPECIALS.cls).all()
  np.testing.assert_array_equal(x[0, 1:31], np.arange(100, 130))
  assert x[0, 31] == SPECIALS.sep
  np.testing.assert_array_equal(x[2, 1:11], np.arange(160, 170))
  assert x[2, 11] == SPECIALS.sep and (x[2, 12:] == SPECIALS.pad).all()
  np.testing.assert_array_equal(x[3, 1:10], np.arange(500, 509))


def test_masking_follows_bert_recipe():
  x = packed(n=400)
  out = pretrain.mask_tokens(x, np.random.default_rng(0), SPECIALS, vocab_size=500, mask_prob=0.15,
                             max_predictions=8)
  real = ~np.isin(x, [0, 2, 3])
  counts = out['weights'].sum(1)
  expected = np.minimum(np.maximum(1, np.rint(real.sum(1) * 0.15)), 8)
  np.testing.assert_array_equal(counts, expected)
  rows = np.arange(len(x))[:, None]
  valid = out['weights'] > 0
  pos = out['positions']
  # Chosen positions are distinct real tokens, labels are the originals.
  for r in range(len(x)):
    p = pos[r][valid[r]]
    assert len(set(p)) == len(p)
    assert real[r, p].all()
  np.testing.assert_array_equal(out['labels'][valid], x[rows, pos][valid])
  # Outside the chosen positions nothing changes.
  changed = out['ids'] != x
  chosen = np.zeros_like(real)
  chosen[np.nonzero(valid)[0], pos[valid]] = True
  assert not (changed & ~chosen).any()
  # 80% [MASK], 10% random, 10% unchanged (within sampling error over ~3000 predictions).
  new = out['ids'][rows, pos][valid]
  orig = out['labels'][valid]
  frac_mask = (new == SPECIALS.mask).mean()
  frac_same = (new == orig).mean()
  assert abs(frac_mask - 0.8) < 0.03, frac_mask
  assert abs(frac_same - 0.1) < 0.03, frac_same  # random draws rarely equal the original (1/500)
  assert (out['mask'] == (x != 0)).all()


def test_batches_are_a_function_of_step_and_masks_change_each_epoch():
  x = packed(n=40)[:40]
  b = pipeline.MLMBatches(x, 8, SPECIALS, 500, seed=3)
  a1, a2 = b.batch(7), b.batch(7)
  for k in a1:
    np.testing.assert_array_equal(a1[k], a2[k])
  row_of = {r.tobytes(): i for i, r in enumerate(x)}
  epoch = lambda e: [row_of[r.tobytes()] for s in range(5 * e, 5 * e + 5) for r in unmask(b.batch(s))]  # noqa
  first, second = epoch(0), epoch(1)
  assert sorted(first) == sorted(second) == list(range(40))  # each example once per epoch
  assert first != second  # reshuffled
  # The same example gets a different mask in the next epoch.
  masks = {}
  for s in range(10):
    batch = b.batch(s)
    for i, r in enumerate(unmask(batch)):
      masks.setdefault(row_of[r.tobytes()], []).append(tuple(batch['positions'][i]))
  assert sum(m[0] != m[1] for m in masks.values()) >= 35
  other = pipeline.MLMBatches(x, 8, SPECIALS, 500, seed=4).batch(7)
  assert not np.array_equal(other['ids'], a1['ids'])


def test_read_files_skips_and_counts_bad_records(tmp_path):
  lines = [json.dumps({'text': 'A review long enough to be kept as a document, surely. ' * 2}),
           '{not json', json.dumps({'label': 1}), json.dumps({'text': 'short'}), '',
           json.dumps({'text': 'Another perfectly fine review of a perfectly fine movie.'})]
  with gzip.open(tmp_path / 'a.jsonl.gz', 'wt') as f:
    f.write('\n'.join(lines))
  (tmp_path / 'b.txt').write_text('First document paragraph is here and long enough.\n\nxx\n\n'
                                  'Second document paragraph, also long enough to keep.')
  (tmp_path / 'c.txt').write_bytes(b'\xff\xfe invalid utf-8 \x80\x81')
  c = corpus.read_files(f'{tmp_path}/*.jsonl.gz,{tmp_path}/*.txt')
  assert len(c.documents) == 4
  assert c.skipped['invalid JSON lines'] == 1
  assert c.skipped["records without a string 'text' field"] == 1
  assert c.skipped['documents under 40 characters'] == 2
  assert c.skipped['lines that are not valid UTF-8'] == 1
  assert c.skipped['files without a usable document'] == 1
  assert 'skipped' in c.summary()


def test_read_files_errors_name_the_field(tmp_path):
  with pytest.raises(ConfigError, match='data.files: .* matches no file'):
    corpus.read_files(str(tmp_path / 'nope*.txt'))
  (tmp_path / 'empty.jsonl').write_text('\n')
  with pytest.raises(ConfigError, match='no usable text'):
    corpus.read_files(str(tmp_path / 'empty.jsonl'))


def test_default_corpus_is_real_english_text():
  c = corpus.default_corpus()
  words = sum(len(d.split()) for d in c.documents)
  assert len(c.documents) > 500 and words > 100_000, c.summary()
  assert any('statement' in d for d in c.documents)


def test_tokenizer_trains_saves_and_loads(tmp_path):
  docs = corpus.default_corpus().documents[:200]
  tok = tokenizer.train_wordpiece(docs, vocab_size=600)
  assert [tok.token_to_id(t) for t in tokenizer.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
  tokenizer.save(tok, str(tmp_path))
  text = 'The assert statement is a convenient way to insert debugging assertions.'
  ids = tok.encode(text, add_special_tokens=False).ids
  assert tokenizer.load(str(tmp_path / 'tokenizer.json')).encode(text, add_special_tokens=False).ids == ids
  assert tokenizer.load(str(tmp_path / 'vocab.txt')).encode(text, add_special_tokens=False).ids == ids
  assert tokenizer.special_ids(tok)['[MASK]'] == 4
  with pytest.raises(ConfigError, match='neither tokenizer.json nor vocab.txt'):
    tokenizer.load(str(tmp_path / 'nothing')) if (tmp_path / 'nothing').mkdir() is None else None


def test_hf_vocab_txt_gives_bert_ids(tmp_path):
  transformers = pytest.importorskip('transformers')
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'cat', 'sat', '##s', 'on', 'mat', '.']
  (tmp_path / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
  ours = tokenizer.load(str(tmp_path / 'vocab.txt')).encode('The cats sat on the mat.',
                                                             add_special_tokens=False).ids
  theirs = transformers.BertTokenizer(str(tmp_path / 'vocab.txt'))('The cats sat on the mat.',
                                                                  add_special_tokens=False)['input_ids']
  assert ours == theirs


@pytest.mark.parametrize('task', ['sop', 'nsp'])
def test_sentence_pairs(task):
  rng = np.random.default_rng(0)
  # Distinct token ranges per document, increasing within each, so order and origin are visible.
  docs = [np.arange(1000 * d + 5, 1000 * d + 5 + int(rng.integers(20, 60))) for d in range(40)]
  out = pipeline.PieceExamples(ListPieces(docs, 29), 32, SPECIALS, task).materialise(10_000, seed=1)
  ids, types, labels = out['ids'], out['type_ids'], out['sentence_labels']
  assert len(ids) > 40 and 0.35 < labels.mean() < 0.65
  for row, typ, label in zip(ids, types, labels):
    seps = np.nonzero(row == SPECIALS.sep)[0]
    assert row[0] == SPECIALS.cls and len(seps) == 2
    a, b = row[1:seps[0]], row[seps[0] + 1:seps[1]]
    assert len(a) and len(b)
    assert (typ[:seps[0] + 1] == 0).all() and (typ[seps[0] + 1:seps[1] + 1] == 1).all()
    assert (typ[seps[1] + 1:] == 0).all() and (row[seps[1] + 1:] == SPECIALS.pad).all()
    same_doc = a[0] // 1000 == b[0] // 1000
    if task == 'sop':
      assert same_doc
      # in order: B continues A exactly; swapped: A continues B.
      assert (b[0] == a[-1] + 1) if label == 0 else (a[0] == b[-1] + 1)
    else:
      assert (same_doc and b[0] == a[-1] + 1) if label == 0 else not same_doc


@pytest.mark.parametrize('task', ['sop', 'nsp'])
def test_sentence_pairs_are_drawn_afresh_every_epoch(task):
  docs = [np.arange(1000 * d + 5, 1000 * d + 65) for d in range(8)]
  examples = pipeline.PieceExamples(ListPieces(docs, 29), 32, SPECIALS, task)
  n = len(examples)
  ds = pipeline.train_dataset(examples, 1, seed=0, masking=pipeline.Masking(SPECIALS, 9000), 
                              shard=grain.sharding.NoSharding())
  # Stream positions e*n .. e*n+n-1 are epoch e: the same pieces in a new order, each with a new pair.
  epochs = [{tuple(unmask(ds[e * n + k])[0]): int(ds[e * n + k]['sentence_labels'][0]) for k in range(n)}
            for e in range(3)]
  assert all(len(e) == n for e in epochs)
  assert len({frozenset(e.items()) for e in epochs}) == 3  # different cuts, swaps and partners per epoch


def test_data_seed_alone_draws_split_vocabulary_order_and_masks(tmp_path):
  """The model seed leaves the held-out documents, the vocabulary, the batches and the eval masks as they are
  (and the tokenised pieces are reused); data.seed changes them."""
  from helpers import micro_config
  from posjax.data import inputs
  rng = np.random.default_rng(0)
  words = [''.join(rng.choice(list('abcdefghij'), 5)) for _ in range(300)]
  with open(tmp_path / 'docs.jsonl', 'w') as f:
    for _ in range(120):
      f.write(json.dumps({'text': ' '.join(rng.choice(words, 60))}) + '\n')

  def data(seed, data_seed):
    c = micro_config(**{'data.files': str(tmp_path / 'docs.jsonl'), 'data.data_dir': str(tmp_path / 'tfds'),
                        'data.vocab_size': 200, 'seed': seed, 'data.seed': data_seed})
    d = inputs.get_datasets(c, str(tmp_path / f'w{seed}{data_seed}'))
    return d.tokenizer.to_str(), d.train[0], next(d.eval.eval_batches(1))

  base, model_seed, data_seed = data(0, 0), data(1, 0), data(0, 1)
  assert model_seed[0] == base[0]
  for a, b in zip(model_seed[1:], base[1:]):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(data_seed[1]['ids'], base[1]['ids'])
  assert not np.array_equal(data_seed[2]['ids'], base[2]['ids'])  # other held-out documents
  # one tokenised copy per held-out split: the model seeds share theirs
  assert len([p for p in (tmp_path / 'tfds' / 'posjax_pieces').iterdir() if p.is_dir()]) == 2
