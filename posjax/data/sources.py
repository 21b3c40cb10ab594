"""Document sources as prepared tfds datasets, read by random access (ArrayRecord, no TensorFlow).

Every source goes through the same path: a tfds dataset in a data dir, read by random access.
- `files`: local corpora (txt / jsonl / tsv, gzip or not, globs) are turned into the dataset `local_corpus`
  by the builder below, one builder config per content: the files' bytes and the text field name the config,
  so an unchanged corpus is prepared once and reused, and an edited one is prepared anew.
- `default`: the offline default corpus (posjax.data.corpus), prepared the same way, keyed by the Python
  version whose documentation it is.
- `tfds`: any catalog dataset by name and text feature, prepared beforehand (`python -m posjax.data.prepare`),
  never downloaded at run time.
Skipped records and why are kept in the prepared dataset's metadata, so a reused dataset reports them too.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import os
import shutil
import sys
from typing import Any

from absl import logging
import jax
import numpy as np
import tensorflow_datasets as tfds

from posjax import locks
from posjax.data import corpus as corpus_lib
from posjax.errors import ConfigError

SOURCES = ('default', 'files', 'tfds')


class LocalCorpusConfig(tfds.core.BuilderConfig):
  """`paths` empty: the default corpus. The config name is a digest of the content."""

  def __init__(self, *, paths=(), text_field='text', **kwargs):
    super().__init__(**kwargs)
    self.paths = tuple(paths)
    self.text_field = text_field


class LocalCorpus(tfds.core.GeneratorBasedBuilder):
  """Documents (feature `text`) of local files or of the default corpus, in file order, one split `train`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'HTML tags removed, documents cut to corpus.MAX_DOC_CHARS characters.'}
  # tfds looks for checksums and metadata files beside a builder's source (its catalog's layout), through
  # `importlib_resources`, which is not installed; ours has no such files.
  code_path = None

  def _info(self):
    # DatasetInfo directly, not dataset_info_from_configs: that one reads metadata files beside the builder's
    # source, which tfds only has for its own catalog.
    return tfds.core.DatasetInfo(
        builder=self, description='Local documents for MLM pretraining.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True)  # documents stay in reading order; the loader shuffles anyway

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    skipped = collections.Counter()
    if self.builder_config.paths:
      docs = corpus_lib.iter_documents(list(self.builder_config.paths), self.builder_config.text_field, skipped)
    else:
      c = corpus_lib.default_corpus()
      docs, skipped = c.documents, c.skipped
    n = 0
    for n, doc in enumerate(docs, 1):
      yield n, {'text': doc}
    # Written with the dataset info once generation ends.
    self.info.metadata['skipped'] = dict(skipped)
    self.info.metadata['files'] = [os.path.abspath(p) for p in self.builder_config.paths]
    if not n:
      raise ConfigError(f'data.files: no usable text in {", ".join(self.builder_config.paths)} (skipped: '
                        f'{corpus_lib.why(skipped)})')


def _content_name(paths, text_field: str) -> str:
  """A digest of what the reader makes of `paths`: their bytes, each file's format (the same bytes as
  `a.jsonl` and as `a.txt` are different corpora), the text field and the reader's version."""
  h = hashlib.sha256(f'{corpus_lib.READER_VERSION}\0{text_field}'.encode())
  for path in paths:
    h.update(f'\0{corpus_lib.file_format(path)}\0'.encode())
    with open(path, 'rb') as f:
      while chunk := f.read(1 << 20):
        h.update(chunk)
    h.update(b'\0')  # file boundaries matter: a document never spans two files
  return 'files_' + h.hexdigest()[:20]


def local_corpus_builder(files: str, text_field: str, data_dir: str) -> LocalCorpus:
  """The builder of `files` (glob patterns; empty: the default corpus), its config named by content."""
  if files:
    paths = corpus_lib.expand(files)
    name, description = _content_name(paths, text_field), f'{len(paths)} file(s): {", ".join(paths[:3])}'
  else:
    paths, description = (), 'default corpus (pydoc_data topics + stdlib docstrings)'
    name = 'default_py' + '_'.join(map(str, sys.version_info[:3]))
  config = LocalCorpusConfig(name=name, description=description, paths=paths, text_field=text_field)
  return LocalCorpus(config=config, data_dir=data_dir, file_format='array_record')


def _reopened(builder: LocalCorpus, data_dir: str) -> LocalCorpus:
  """The same builder, made again to read what is on disk now (its content name is not hashed again)."""
  return LocalCorpus(config=builder.builder_config, data_dir=data_dir, file_format='array_record')


def _prepare(builder: LocalCorpus, data_dir: str) -> LocalCorpus:
  if builder.is_prepared():
    return builder
  version_dir = builder.data_dir
  # Runs preparing the same content into one data dir take turns; the one holding the lock knows that any
  # `incomplete.*` directory tfds left beside it is a killed run's, and deletes it.
  with locks.locked(os.path.join(os.path.dirname(version_dir), 'prepare.lock')):
    builder = _reopened(builder, data_dir)
    if builder.is_prepared():
      return builder
    parent = os.path.dirname(version_dir)
    for name in os.listdir(parent):
      if name.startswith('incomplete.'):
        logging.warning('deleting %s, left by a preparation that did not finish', os.path.join(parent, name))
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tfds.disable_progress_bar()
    logging.info('preparing %s into %s', builder.builder_config.description, version_dir)
    with contextlib.redirect_stdout(io.StringIO()):  # tfds prints "Downloading and preparing ... Unknown size"
      builder.download_and_prepare()
    return builder


def prepare_local(files: str, text_field: str, data_dir: str) -> LocalCorpus:
  """The prepared builder of `files`; on several hosts, process 0 prepares it and the others wait."""
  builder = local_corpus_builder(files, text_field, data_dir)
  if jax.process_count() == 1:
    return _prepare(builder, data_dir)
  from posjax.training import distributed  # pylint: disable=g-import-not-at-top
  distributed.everyone(lambda: jax.process_index() == 0 and _prepare(builder, data_dir),
                       'preparing the local corpus')
  builder = _reopened(builder, data_dir)  # what process 0 wrote
  if not builder.is_prepared():
    raise ConfigError(f'data.data_dir: {data_dir} (prepared by process 0) is not visible to process '
                      f'{jax.process_index()}: a multi-host run needs a shared data dir')
  return builder


def default_data_dir(workdir: str) -> str:
  return os.environ.get('TFDS_DATA_DIR') or os.path.join(workdir, 'tensorflow_datasets')


def _prepare_hint(name: str, data_dir: str) -> str:
  return (f"prepare it with `python -m posjax.data.prepare --tfds_name={name} --data_dir={data_dir} "
          "--manual_dir=DIR` (DIR holding the files the dataset's builder asks for), or train on local files: "
          f"`--config.data.source=files --config.data.files='GLOB'`")


def open_tfds(name: str, split: str, data_dir: str):
  """The random-access source of a prepared catalog dataset (ArrayRecord): `tfds.data_source` with
  download=False, with its two failure modes (not prepared, prepared as TFRecord) turned into clear errors."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError(f'data.tfds_name: {name!r} is neither in the tfds catalog nor prepared in {data_dir} '
                      f'({str(e).splitlines()[0]}); {_prepare_hint(name, data_dir)}') from None
  except ValueError as e:  # tfds could not parse it as a dataset name
    raise ConfigError(f'data.tfds_name: {name!r} is not a tfds dataset name (NAME[/CONFIG][:VERSION], e.g. '
                      f'imdb_reviews or wikipedia/20230601.en): {str(e).splitlines()[0]}') from None
  if not builder.is_prepared():
    raise ConfigError(f'data.tfds_name: {name!r} is not prepared in {data_dir} and is never downloaded at run '
                      f'time; {_prepare_hint(name, data_dir)}')
  if split not in builder.info.splits:
    raise ConfigError(f'data.tfds_split: {split!r} is not a split of {name} (splits: '
                      f'{", ".join(builder.info.splits)})')
  try:
    return builder.as_data_source(split=split)
  except NotImplementedError:
    raise ConfigError(f'data.tfds_name: {name!r} in {data_dir} was prepared as {builder.info.file_format}, '
                      'which has no random access; prepare it again with `python -m posjax.data.prepare '
                      f'--tfds_name={name} --data_dir=NEW_DIR` (ArrayRecord)') from None


@dataclasses.dataclass
class Documents:
  """The records of a prepared dataset, read by random access (nothing is loaded up front): record `i`'s
  cleaned text is `texts([i])`. `identity` names the content (for caches built from it)."""
  source: Any  # a tfds data source: len() and __getitems__
  feature: str
  what: str
  identity: str
  skipped: collections.Counter  # found while preparing the dataset (local corpora)
  remedy: str = ''  # what to do after deleting a damaged prepared dataset

  def __len__(self):
    return len(self.source)

  def texts(self, indices, skipped: collections.Counter) -> list[tuple[int, str]]:
    """(index, cleaned text) of the records at `indices` that hold usable text; the rest counted in
    `skipped`."""
    indices = [int(i) for i in indices]
    try:
      records = self.source.__getitems__(indices) if indices else []
    except RuntimeError as e:  # array_record / riegeli: a damaged (truncated, overwritten) file
      raise self._damaged(str(e).splitlines()[0][:200]) from None
    out = []
    for i, record in zip(indices, records):
      if record is None or any(v is None for v in record.values()):  # what a cut-short file reads back as
        raise self._damaged(f'record {i} reads back empty')
      if self.feature not in record:
        raise ConfigError(f'data.text_feature: {self.what} has no feature {self.feature!r} (features: '
                          f'{", ".join(sorted(record))})')
      text = record[self.feature]
      if isinstance(text, (bytes, np.bytes_)):
        try:
          text = bytes(text).decode('utf-8')
        except UnicodeDecodeError:
          skipped['records that are not valid UTF-8'] += 1
          continue
      if not isinstance(text, str):
        raise ConfigError(f'data.text_feature: {self.feature!r} of {self.what} is not text '
                          f'({type(text).__name__})')
      doc = corpus_lib.clean(text, skipped)
      if doc is not None:
        out.append((i, doc))
    return out

  def _damaged(self, why: str) -> ConfigError:
    return ConfigError(f'{self.what}: a prepared file is damaged ({why}); delete the prepared dataset\'s '
                       f'directory{self.remedy}')

  def iter_texts(self, indices, skipped: collections.Counter, block: int = 1024):
    """Cleaned texts of the records at `indices`, in order, read `block` records at a time."""
    indices = np.asarray(indices)
    for start in range(0, len(indices), block):
      for _, doc in self.texts(indices[start:start + block], skipped):
        yield doc


def open_documents(data, workdir: str) -> Documents:
  """The configured documents (`data`: the config's data fields) as a prepared tfds dataset."""
  if data.source not in SOURCES:
    raise ConfigError(f'data.source {data.source!r} is not one of {", ".join(SOURCES)}')
  data_dir = data.data_dir or default_data_dir(workdir)
  if data.source == 'tfds':
    if not data.tfds_name:
      raise ConfigError('data.tfds_name is empty; data.source=tfds needs a catalog name like imdb_reviews')
    source = open_tfds(data.tfds_name, data.tfds_split, data_dir)
    where = f'{data.tfds_name}[{data.tfds_split}]'
    what = f'tfds {where} feature {data.text_feature!r} in {data_dir}'
    return Documents(source, data.text_feature, what, f'tfds:{where}:{data.text_feature}:{data_dir}',
                     collections.Counter(), f' in {data_dir} and prepare it again ({_prepare_hint(data.tfds_name, data_dir)})')
  if data.source == 'files' and not data.files:
    raise ConfigError('data.files is empty; data.source=files needs glob pattern(s)')
  builder = prepare_local(data.files, data.text_field, data_dir)  # source 'default' reads data.files too
  what = f'{builder.builder_config.description} (tfds {builder.info.full_name} in {data_dir})'
  return Documents(builder.as_data_source(split='train'), 'text', what, f'local:{builder.info.full_name}',
                   collections.Counter(builder.info.metadata.get('skipped', {})),
                   f' ({builder.data_dir}): the next run prepares it again from the files')


def held_out(n: int, seed: int, fraction: float) -> np.ndarray:
  """(n,) bool: the records held out for evaluation, a seeded draw per record, so later analyses find the
  same split; drawn in blocks, the same numbers as one draw, to bound memory on catalog-sized datasets."""
  rng = np.random.default_rng([seed, 3])
  out = np.concatenate([rng.random(min(1 << 22, n - s)) < fraction for s in range(0, n, 1 << 22)] or
                       [np.zeros(0, bool)])
  if out.all() or not out.any():  # tiny datasets: keep at least one record on each side
    out = np.zeros(n, bool)
    out[-1] = n > 1
  return out


def load(data, workdir: str) -> corpus_lib.Corpus:
  """All the configured documents in memory (small corpora; pretraining streams them instead)."""
  docs = open_documents(data, workdir)
  skipped = collections.Counter(docs.skipped)
  texts = list(docs.iter_texts(np.arange(len(docs)), skipped))
  c = corpus_lib.Corpus(texts, docs.what, skipped)
  if not texts:
    raise ConfigError(f'data.source={data.source}: no usable text ({c.summary()})')
  return c
