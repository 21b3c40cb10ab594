"""Sources through prepared tfds datasets: local corpora, the default corpus, catalog datasets, bad input."""

import gzip
import json
import subprocess
import sys

import ml_collections
import pytest

from helpers import ROOT
from posjax.data import corpus, prepare, sources
from posjax.errors import ConfigError

GOOD = 'A perfectly ordinary review of a perfectly ordinary film, long enough to keep.'


def data_fields(tmp_path, **kw):
  d = dict(source='files', files='', text_field='text', tfds_name='', tfds_split='train', text_feature='text',
           data_dir=str(tmp_path / 'tfds'))
  d.update(kw)
  return ml_collections.ConfigDict(d)


def write_bad_corpus(tmp_path):
  (tmp_path / 'empty.txt').write_text('')
  (tmp_path / 'mixed.txt').write_bytes(
      GOOD.encode() + b'\n\n' + b'\xff\xfe not utf-8 \x80\n' + b'\n' + b'word ' * 300_000 + b'\n\n' +
      b'<br /><br />' + GOOD.encode() + b' <i>Really.</i>\n')
  with gzip.open(tmp_path / 'r.jsonl.gz', 'wt') as f:
    f.write('\n'.join([json.dumps({'text': GOOD}), '{oops', json.dumps({'title': 'x'}), json.dumps({'text': 'tiny'})]))
  (tmp_path / 's.tsv').write_text(f'label\ttext\n1\t{GOOD}\n0\ttoo\tmany\tcolumns\n')


def test_local_corpus_counts_bad_input_and_is_reused(tmp_path):
  write_bad_corpus(tmp_path)
  d = data_fields(tmp_path, files=f'{tmp_path}/*.txt,{tmp_path}/*.gz,{tmp_path}/*.tsv')
  c = sources.load(d, str(tmp_path))
  assert len(c.documents) == 5, c.summary()
  assert c.documents[0] == GOOD
  assert corpus.MAX_DOC_CHARS - 5 < len(c.documents[1]) <= corpus.MAX_DOC_CHARS  # the 1.5 MB line, cut
  assert c.documents[2].startswith(GOOD) and '<' not in c.documents[2]
  expected = {'files without a usable document': 1, 'lines that are not valid UTF-8': 1,
              f'documents cut to {corpus.MAX_DOC_CHARS} characters (kept)': 1,
              'documents with HTML tags removed (kept)': 1, 'invalid JSON lines': 1,
              "records without a string 'text' field": 1, 'documents under 40 characters': 1,
              'TSV rows with the wrong number of columns': 1}
  assert dict(c.skipped) == expected
  # Prepared once: a second load reads the same dataset (and its counts) without preparing again.
  builder = sources.local_corpus_builder(d.files, 'text', d.data_dir)
  assert builder.is_prepared()
  again = sources.load(d, str(tmp_path))
  assert again.documents == c.documents and again.skipped == c.skipped
  # Different content, different dataset.
  (tmp_path / 's.tsv').write_text(f'label\ttext\n1\t{GOOD} Changed.\n')
  assert sources.local_corpus_builder(d.files, 'text', d.data_dir).builder_config.name != \
      builder.builder_config.name


def test_nothing_usable_is_an_error_not_an_empty_dataset(tmp_path):
  (tmp_path / 'a.txt').write_bytes(b'\xff\xfe\n\nshort\n')
  (tmp_path / 'b.jsonl').write_text('')
  with pytest.raises(ConfigError, match='no usable text'):
    sources.load(data_fields(tmp_path, files=f'{tmp_path}/*'), str(tmp_path))
  (tmp_path / 'c.tsv').write_text('sentence\tlabel\nhi\t1\n')
  with pytest.raises(ConfigError, match="data.text_field: 'text' is not a column of .*sentence, label"):
    sources.load(data_fields(tmp_path, files=f'{tmp_path}/c.tsv'), str(tmp_path))


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(ConfigError, match=r'imdb_reviews.* is not prepared .*python -m posjax.data.prepare'):
    sources.load(data_fields(tmp_path, source='tfds', tfds_name='imdb_reviews'), str(tmp_path))
  with pytest.raises(ConfigError, match='data.source .* is not one of default, files, tfds'):
    sources.load(data_fields(tmp_path, source='hub'), str(tmp_path))


TINY_BUILDER = '''
import tensorflow_datasets as tfds

class TinyReviews(tfds.core.GeneratorBasedBuilder):
  """imdb_reviews-like: `text` and `label`, splits train and test, from files in the manual dir."""
  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'train.tsv and test.tsv: label, tab, text'
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'text': tfds.features.Text(), 'label': tfds.features.ClassLabel(names=['neg', 'pos'])}))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(dl_manager.manual_dir / f'{s}.tsv') for s in ('train', 'test')}

  def _generate_examples(self, path):
    for i, line in enumerate(path.read_text().splitlines()):
      label, text = line.split('\\t')
      yield i, {'text': text, 'label': int(label)}
'''


def write_tiny_reviews(tmp_path, n=60):
  """A tfds catalog-style builder in its own file, and the 'downloaded' files it reads."""
  (tmp_path / 'tiny_reviews.py').write_text(TINY_BUILDER)
  manual = tmp_path / 'manual'
  manual.mkdir()
  words = 'good bad film plot actor scene music story slow funny dull great'.split()
  for split, count in (('train', n), ('test', 8)):
    rows = [f'{i % 2}\t' + ' '.join(words[(i * 7 + j * 3) % len(words)] for j in range(40 + i % 9))
            for i in range(count)]
    (manual / f'{split}.tsv').write_text('\n'.join(rows) + '\n')
  return manual


def test_catalog_style_dataset_prepared_from_local_files(tmp_path):
  manual = write_tiny_reviews(tmp_path)
  data_dir = str(tmp_path / 'tfds')
  prepare.prepare_tfds('tiny_reviews', data_dir, str(manual), str(tmp_path / 'tiny_reviews.py'))
  c = sources.load(data_fields(tmp_path, source='tfds', tfds_name='tiny_reviews', data_dir=data_dir),
                   str(tmp_path))
  texts = [l.split('\t')[1] for l in (manual / 'train.tsv').read_text().splitlines()]
  assert sorted(c.documents) == sorted(texts)
  with pytest.raises(ConfigError, match="data.text_feature: .* no feature 'sentence' .*label, text"):
    sources.load(data_fields(tmp_path, source='tfds', tfds_name='tiny_reviews', data_dir=data_dir,
                             text_feature='sentence'), str(tmp_path))
  with pytest.raises(ConfigError, match="data.tfds_split: 'validation' .*train"):
    sources.load(data_fields(tmp_path, source='tfds', tfds_name='tiny_reviews', data_dir=data_dir,
                             tfds_split='validation'), str(tmp_path))


def test_prepare_cli_prepares_local_files(tmp_path):
  (tmp_path / 'a.txt').write_text(f'{GOOD}\n\n{GOOD} Again.\n')
  out = subprocess.run([sys.executable, '-m', 'posjax.data.prepare', f'--files={tmp_path}/a.txt',
                        f'--data_dir={tmp_path}/tfds'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert '2 documents' in out.stdout
  assert sources.local_corpus_builder(f'{tmp_path}/a.txt', 'text', f'{tmp_path}/tfds').is_prepared()
