"""posjax entry point: pretraining, or fine-tuning with configs/glue.py.

    python train.py --config=configs/bert.py:tiny --workdir=/tmp/posjax-tiny
    python train.py --config=configs/bert.py:base,absolute --workdir=DIR --config.num_train_steps=1000
    python train.py --config=configs/glue.py:sst2 --config.init_from=/tmp/posjax-tiny \
        --config.data.dir=GLUE_DIR --workdir=/tmp/sst2

Rerunning with the same --workdir resumes from its latest checkpoint.
"""

import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from posjax.errors import ConfigError, NonFiniteError
from posjax.training import host_memory

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.')
config_flags.DEFINE_config_file('config', None, 'A config file, optionally with an argument: FILE.py:ARG.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments: {" ".join(argv[1:])} (flags take the form --name=value)')
  logging.info(host_memory.keep_freed_memory())
  logging.info('config:\n%s', FLAGS.config)
  try:
    if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
      raise ConfigError(f'--workdir {FLAGS.workdir!r} is a file, not a directory')
    if 'task' in FLAGS.config:  # configs/glue.py: fine-tuning
      from posjax.finetune import loop as finetune  # pylint: disable=g-import-not-at-top
      finetune.run(FLAGS.config, FLAGS.workdir)
    else:
      from posjax.training import loop  # pylint: disable=g-import-not-at-top  (after flags: faster --help)
      loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except NonFiniteError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)


def check_config_args(argv):
  """Evaluates --config=FILE.py:ARG and the names of --config.FIELD overrides once, up front, so a bad size,
  variant or field name prints one line rather than the traceback ml_collections' flag parser wraps round it."""
  config = None
  for a in argv[1:]:
    if a.startswith('--config='):
      path, _, arg = a.split('=', 1)[1].partition(':')
      if not os.path.isfile(path):
        sys.exit(f'error: --config: {path!r} is not a file (e.g. --config=configs/bert.py:tiny)')
      spec = importlib.util.spec_from_file_location('posjax_config_check', path)
      module = importlib.util.module_from_spec(spec)
      try:
        spec.loader.exec_module(module)
        config = module.get_config(arg) if arg else module.get_config()
      except ConfigError as e:
        sys.exit(f'error: {e}')
  if config is None:
    return
  for a in argv[1:]:
    if a.startswith('--config.'):
      field = a[len('--config.'):].split('=', 1)[0]
      node, walked = config, []
      for part in field.split('.'):
        if not hasattr(node, 'keys') or part not in node:
          where = 'config.' + '.'.join(walked) if walked else 'config'
          valid = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(none: not a group)'
          sys.exit(f'error: unknown config field config.{field}; valid fields of {where}: {valid}')
        node = node[part]
        walked.append(part)


def cli(argv):
  """What `python train.py ARGS` does with argv = ['train.py', ARGS...]; exits (SystemExit) when done."""
  check_config_args(argv)
  app.run(main, argv=argv)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  # orbax narrates every save at INFO; keep the log readable (its warnings and errors still show).
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.converter.STANDARD_WARNING or '/orbax/' not in r.pathname)
  cli(sys.argv)
