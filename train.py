"""posjax entry point: pretraining, or fine-tuning with configs/glue.py.

    python train.py --config=configs/bert.py:tiny --workdir=/tmp/posjax-tiny
    python train.py --config=configs/bert.py:base,absolute --workdir=DIR --config.num_train_steps=1000
    python train.py --config=configs/glue.py:sst2 --config.init_from=/tmp/posjax-tiny \
        --config.data.dir=GLUE_DIR --workdir=/tmp/sst2

`--config` takes a config file (FILE.py[:ARG]) or a config of the package (bert, albert, electra, convbert,
glue: `--config=bert:tiny,tisa`); `--config.FIELD=VALUE` overrides any field. Rerunning with the same
--workdir resumes from its latest checkpoint. Exit statuses: posjax/errors.py.
"""

import sys

from absl import app, flags, logging

from posjax import configs
from posjax.errors import ConfigError, Error
from posjax.training import host_memory

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.')
flags.DEFINE_string('config', None, 'A config file, optionally with an argument (FILE.py:ARG), or a config of '
                    'the package (bert, albert, electra, convbert, glue; e.g. bert:tiny,tisa). Override any '
                    'field with --config.FIELD=VALUE.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str) -> dict:
  """Fine-tuning for a config with a `task` (configs/glue.py), else pretraining."""
  if 'task' in config:
    from posjax.finetune import finetuning  # pylint: disable=g-import-not-at-top  (after flags: faster --help)
    return finetuning.run(config, workdir)
  from posjax.training import pretraining  # pylint: disable=g-import-not-at-top
  return pretraining.train_and_evaluate(config, workdir)


def main(argv, config):
  if len(argv) > 1:
    print(f'error: unexpected arguments: {" ".join(argv[1:])} (flags take the form --name=value)',
          file=sys.stderr)
    sys.exit(2)
  logging.info(host_memory.keep_freed_memory())
  logging.info('config:\n%s', config)
  from posjax.training import trainer  # pylint: disable=g-import-not-at-top
  try:
    run(config, FLAGS.workdir)
  except trainer.Stopped as e:
    logging.warning('%s', e)
    sys.exit(e.exit_code)
  except Error as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(e.exit_code)


def cli(argv):
  """What `python train.py ARGS` does with argv = ['train.py', ARGS...]; exits (SystemExit) when done. The
  config file is executed once, and a bad size, variant or field prints one line."""
  try:
    config, rest = configs.from_argv(argv)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if config is not None:
    config.lock()
    rest.append(f'--config={next(a for a in argv if a.startswith("--config=")).split("=", 1)[1]}')
  app.run(lambda a: main(a, config), argv=rest)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  # orbax narrates every save at INFO; keep the log readable (its warnings and errors still show).
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.converter.STANDARD_WARNING or '/orbax/' not in r.pathname)
  cli(sys.argv)
