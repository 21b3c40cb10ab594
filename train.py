"""posjax entry point: pretraining, or fine-tuning with configs/glue.py.

    python train.py --config=configs/bert.py:tiny --workdir=/tmp/posjax-tiny
    python train.py --config=configs/bert.py:base,absolute --workdir=DIR --config.num_train_steps=1000
    python train.py --config=configs/glue.py:sst2 --config.init_from=/tmp/posjax-tiny \
        --config.data.dir=GLUE_DIR --workdir=/tmp/sst2
    python train.py --config=configs/bert.py:large --compile_only=v5e-64   # as python -m posjax.aot

Rerunning with the same --workdir resumes from its latest checkpoint. `--compile_only=TOPOLOGY` compiles the
train step for a TPU slice on this host and reports its memory, FLOPs and collectives per chip (no data,
no workdir; see posjax/aot).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from posjax.aot import cli as aot_cli
from posjax.cli import check_config_args
from posjax.errors import ConfigError, NonFiniteError
from posjax.training import host_memory

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.')
config_flags.DEFINE_config_file('config', None, 'A config file, optionally with an argument: FILE.py:ARG.',
                                lock_config=True)
aot_cli.define_flags('compile_only')  # --compile_only=TOPOLOGY: the same as python -m posjax.aot
flags.mark_flags_as_required(['config'])
flags.register_multi_flags_validator(
    ['workdir', 'compile_only'], lambda f: f['workdir'] is not None or f['compile_only'] is not None,
    message='--workdir is required (unless --compile_only=TOPOLOGY)')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments: {" ".join(argv[1:])} (flags take the form --name=value)')
  if FLAGS.compile_only:
    sys.exit(aot_cli.run(FLAGS.config, FLAGS.compile_only, FLAGS.num_slices, FLAGS.find_max_batch,
                         FLAGS.dump_hlo, FLAGS.report_json))
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
