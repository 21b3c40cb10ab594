"""Prepare a dataset for pretraining (ArrayRecord in a tfds data dir), before training, on one host.

    # local files -> local_corpus/files_<digest> (what data.source=files would prepare on first use)
    python -m posjax.data.prepare --files='corpus/*.jsonl.gz' --data_dir=DIR
    # a tfds catalog dataset, from files fetched beforehand (no network at run time)
    python -m posjax.data.prepare --tfds_name=imdb_reviews --data_dir=DIR --manual_dir=DOWNLOADS
    # a builder of your own, defined in a Python file
    python -m posjax.data.prepare --tfds_name=my_reviews --builder_file=my_reviews.py --data_dir=DIR

Then train with `--config.data.data_dir=DIR` and `data.source=files` (same files) or `data.source=tfds`,
`data.tfds_name=NAME`.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags

from posjax.errors import ConfigError

flags.DEFINE_string('files', '', 'glob pattern(s) of local .txt / .jsonl / .tsv files (gzip or not)')
flags.DEFINE_string('text_field', 'text', 'JSON field / TSV column holding the text')
flags.DEFINE_string('tfds_name', '', 'a tfds dataset name, e.g. imdb_reviews or wikipedia/20230601.en')
flags.DEFINE_string('builder_file', '', 'a Python file defining the builder of --tfds_name')
flags.DEFINE_string('manual_dir', '', "directory holding the source files a tfds builder's docs ask for")
flags.DEFINE_string('data_dir', '', 'tfds data dir (default: $TFDS_DATA_DIR)')
FLAGS = flags.FLAGS


def prepare_tfds(name: str, data_dir: str, manual_dir: str = '', builder_file: str = ''):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if builder_file:
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(builder_file))[0],
                                                  builder_file)
    module = importlib.util.module_from_spec(spec)
    with tfds.core.registered.skip_registration():  # loading the same file twice is no conflict
      spec.loader.exec_module(module)
    base, _, config = name.partition('/')
    found = [c for c in vars(module).values() if isinstance(c, type) and
             issubclass(c, tfds.core.DatasetBuilder) and getattr(c, 'name', None) == base]
    if not found:
      raise ValueError(f'{builder_file} defines no tfds builder named {base!r}')
    builder = found[0](data_dir=data_dir, file_format='array_record', config=config or None)
  else:
    try:
      builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
    except ValueError as e:  # not in the catalog (DatasetNotFoundError), or not a dataset name at all
      raise ConfigError(f'--tfds_name: {name!r}: {str(e).splitlines()[0]} (or give --builder_file)') from None
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None))
  except (OSError, ConnectionError) as e:
    raise ConfigError(f'preparing {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}; its builder reads '
                      f'its source files from --manual_dir (given: {manual_dir or "none"}) or downloads them, and '
                      'this machine cannot: fetch them beforehand') from None
  except Exception as e:  # pylint: disable=broad-except  (requests' errors when a builder tries the network)
    if type(e).__module__.split('.')[0] not in ('requests', 'urllib3'):
      raise
    raise ConfigError(f'preparing {name}: its builder tried to download its source files ({str(e)[:200]}); '
                      'posjax never downloads: fetch them beforehand into --manual_dir') from None
  return builder


def main(argv):
  del argv
  try:
    prepare(FLAGS)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(e.exit_code)


def prepare(flags_):
  from posjax.data import sources  # pylint: disable=g-import-not-at-top
  data_dir = flags_.data_dir or os.environ.get('TFDS_DATA_DIR')
  if not data_dir:
    raise ConfigError('--data_dir (or $TFDS_DATA_DIR) is required')
  if bool(flags_.files) == bool(flags_.tfds_name):
    raise ConfigError('give exactly one of --files and --tfds_name')
  if flags_.files:
    builder = sources.prepare_local(flags_.files, flags_.text_field, data_dir)
    print(f'{builder.info.full_name} in {data_dir}: {builder.info.splits["train"].num_examples} documents; '
          f'skipped: {builder.info.metadata.get("skipped")}')
  else:
    builder = prepare_tfds(flags_.tfds_name, data_dir, flags_.manual_dir, flags_.builder_file)
    print(f'{builder.info.full_name} in {data_dir}: ' +
          ', '.join(f'{k} {v.num_examples}' for k, v in builder.info.splits.items()))


if __name__ == '__main__':
  from posjax import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_tpu_probe()
  app.run(main)
