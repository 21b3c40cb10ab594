"""Property tests of the data path: whatever bytes, records or token lists come in, bad ones are skipped and
counted, good ones come through intact, and nothing but a one-line ConfigError ever escapes."""

import gzip
import json

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import ListPieces
from posjax.data import corpus, pipeline, pretrain
from posjax.errors import ConfigError

SPECIALS = pretrain.Specials(pad=0, unk=1, cls=2, sep=3, mask=4)
CHEAP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SUFFIXES = st.sampled_from(['.txt', '.jsonl', '.json', '.jsonl.gz', '.txt.gz'])


def read(path):
  """The corpus, or None when read_files says (in one line) that nothing usable is there."""
  try:
    return corpus.read_files(str(path))
  except ConfigError as e:
    assert str(e).startswith('data.files: no usable text') and '\n' not in str(e)
    return None


def check(c):
  if c is not None:
    assert c.documents and all(isinstance(d, str) for d in c.documents)
    assert all(corpus.MIN_DOC_CHARS <= len(d) <= corpus.MAX_DOC_CHARS for d in c.documents)
    assert all(n > 0 for n in c.skipped.values())
    c.summary()


@CHEAP
@given(data=st.binary(max_size=4000), suffix=SUFFIXES, gz_header=st.booleans())
def test_random_bytes_never_crash(tmp_path_factory, data, suffix, gz_header):
  if gz_header:  # a valid gzip header before random bytes reaches the decompressor proper
    data = gzip.compress(b'')[:10] + data
  path = tmp_path_factory.mktemp('bytes') / f'f{suffix}'
  path.write_bytes(data)
  check(read(path))


records = st.one_of(
    st.fixed_dictionaries({'text': st.text(max_size=120)}),  # some empty, some short, some fine
    st.fixed_dictionaries({'body': st.text(max_size=50)}),  # the wrong field
    st.fixed_dictionaries({'text': st.integers() | st.none() | st.lists(st.text(), max_size=2)}),
    st.lists(st.integers(), max_size=3),  # valid JSON, not an object
    st.text(max_size=40).map(lambda s: {'raw': s}),
    st.just('{"text": "cut short'),  # a half-written line
    st.binary(max_size=60),  # not UTF-8 (usually)
)


def encode(r):
  if isinstance(r, bytes):
    return r.replace(b'\n', b' ')
  if isinstance(r, str):
    return r.encode()
  return json.dumps(r).encode()


def expected_documents(lines):
  """The oracle: what a careful reader keeps from each line on its own."""
  docs = []
  for raw in lines:
    try:
      r = json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError):
      continue
    if isinstance(r, dict) and isinstance(r.get('text'), str):
      t = r['text'].strip()
      if corpus.MIN_DOC_CHARS <= len(t) <= corpus.MAX_DOC_CHARS:
        docs.append(t)
  return docs


@CHEAP
@given(rs=st.lists(records, max_size=25), gz=st.booleans())
def test_jsonl_keeps_exactly_the_good_records_and_counts_the_rest(tmp_path_factory, rs, gz):
  lines = [encode(r) for r in rs]
  lines = [l for l in lines if l.strip() and b'\n' not in l and b'\r' not in l]
  blob = b'\n'.join(lines) + b'\n'
  path = tmp_path_factory.mktemp('jsonl') / ('f.jsonl.gz' if gz else 'f.jsonl')
  path.write_bytes(gzip.compress(blob) if gz else blob)
  c = read(path)
  check(c)
  want = expected_documents(l for l in lines if l.strip())
  if not want:
    assert c is None
    return
  assert c.documents == want
  assert sum(c.skipped.values()) == len([l for l in lines if l.strip()]) - len(want)


def test_enormous_records_are_cut_and_empty_ones_skipped_all_counted(tmp_path):
  path = tmp_path / 'f.jsonl'
  good = 'a perfectly ordinary review of a perfectly ordinary film, ' * 3
  path.write_text('\n'.join(json.dumps({'text': t}) for t in
                            [good, '', ' ' * 100, 'x' * (corpus.MAX_DOC_CHARS + 1), good]) + '\n')
  c = corpus.read_files(str(path))
  assert c.documents == [good.strip(), 'x' * corpus.MAX_DOC_CHARS, good.strip()]
  assert c.skipped == {f'documents under {corpus.MIN_DOC_CHARS} characters': 2,
                       f'documents cut to {corpus.MAX_DOC_CHARS} characters (kept)': 1}


token_lists = st.lists(st.lists(st.integers(5, 999), max_size=300) | st.just([]), max_size=12)


@settings(max_examples=40, deadline=None)
@given(docs=token_lists, seq_len=st.integers(8, 70))
def test_pack_keeps_every_chunk_of_eight_or_more_tokens(docs, seq_len):
  x = pretrain.pack(docs, seq_len, SPECIALS)
  body = seq_len - 2
  chunks = [d[s:s + body] for d in docs for s in range(0, len(d), body) if len(d[s:s + body]) >= 8]
  assert x.shape == (len(chunks), seq_len) and x.dtype == np.int32
  for row, chunk in zip(x, chunks):
    n = len(chunk)
    assert row[0] == SPECIALS.cls and row[n + 1] == SPECIALS.sep and (row[n + 2:] == SPECIALS.pad).all()
    assert row[1:n + 1].tolist() == chunk


@settings(max_examples=40, deadline=None)
@given(docs=token_lists, seq_len=st.integers(11, 70), seed=st.integers(0, 2**31), task=st.sampled_from(['nsp', 'sop']))
def test_pairs_frame_two_segments(docs, seq_len, seed, task):
  out = pipeline.PieceExamples(ListPieces(docs, seq_len - 3), seq_len, SPECIALS, task).materialise(1000, seed)
  if 'sentence_labels' not in out:  # no piece at all
    out.update(type_ids=out['ids'], sentence_labels=np.zeros(0, np.int32))
  n = sum(1 for d in docs for s in range(0, len(d), seq_len - 3) if len(d[s:s + seq_len - 3]) >= 8)
  assert out['ids'].shape == out['type_ids'].shape == (n, seq_len) and out['sentence_labels'].shape == (n,)
  for ids, types in zip(out['ids'], out['type_ids']):
    seps = np.flatnonzero(ids == SPECIALS.sep)
    assert ids[0] == SPECIALS.cls and len(seps) == 2 and 1 < seps[0] < seps[1] - 1
    assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:seps[1] + 1] == 1).all()
    assert (ids[seps[1] + 1:] == SPECIALS.pad).all() and (types[seps[1] + 1:] == 0).all()
  assert set(out['sentence_labels'].tolist()) <= {0, 1}


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 60), min_size=12, max_size=12), min_size=1, max_size=6),
       seed=st.integers(0, 2**31), mask_prob=st.floats(0.01, 0.99), max_predictions=st.integers(1, 12))
def test_masking_only_touches_chosen_real_tokens(rows, seed, mask_prob, max_predictions):
  ids = np.asarray(rows, np.int32)
  out = pretrain.mask_tokens(ids, np.random.default_rng(seed), SPECIALS, 61, mask_prob, max_predictions)
  real = ~np.isin(ids, [SPECIALS.pad, SPECIALS.cls, SPECIALS.sep])
  n = real.sum(1)
  want = np.minimum(np.minimum(np.maximum(1, np.rint(n * mask_prob)), max_predictions), n)
  np.testing.assert_array_equal(out['weights'].sum(1), want)
  for b in range(len(ids)):
    chosen = out['positions'][b][out['weights'][b] == 1]
    assert len(set(chosen.tolist())) == len(chosen) and real[b, chosen].all()
    np.testing.assert_array_equal(out['labels'][b][out['weights'][b] == 1], ids[b, chosen])
    untouched = np.setdiff1d(np.arange(ids.shape[1]), chosen)
    np.testing.assert_array_equal(out['ids'][b, untouched], ids[b, untouched])
  np.testing.assert_array_equal(out['mask'], ids != SPECIALS.pad)


@CHEAP
@given(paragraphs=st.lists(st.text(st.characters(blacklist_categories=['Cs']), max_size=90), max_size=8),
       newline=st.sampled_from(['\n', '\r\n']))
def test_plain_text_splits_at_blank_lines_whatever_the_line_ends(tmp_path_factory, paragraphs, newline):
  paragraphs = [' '.join(p.split()) for p in paragraphs]  # no blank lines inside a paragraph
  path = tmp_path_factory.mktemp('txt') / 'f.txt'
  path.write_bytes((newline * 2).join(paragraphs).encode('utf-8'))
  c = read(path)
  check(c)
  want = [p for p in paragraphs if len(p) >= corpus.MIN_DOC_CHARS]
  assert (c.documents if c else []) == want
