"""The `posjax` command: one entry point for everything posjax runs, from a pip install or a clone.

    posjax train --config=bert:tiny,tisa --workdir=runs/tisa [--config.FIELD=VALUE ...]
    posjax finetune --config=glue:sst2 --config.init_from=runs/tisa --config.data.dir=GLUE --workdir=runs/sst2
    posjax compare --quick --out runs/cmp
    posjax analyze --checkpoint=runs/tisa --out=runs/tisa/figures
    posjax extrapolate runs/tisa runs/alibi --multiples=1,2,4
    posjax export runs/tisa hf/tisa
    posjax plot runs/tisa
    posjax aot --config=bert:large,tisa --topology=v5e-64
    posjax prepare --files='corpus/*.jsonl.gz' --data_dir=DIR

`python train.py ARGS` is `posjax train ARGS`. Exit statuses are the same for every command (posjax/errors.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from posjax.errors import ConfigError, Error

# command -> (module whose main(argv) runs it, one sentence of help)
COMMANDS = {
    'train': ('posjax.cli', 'Pretrains a model (or fine-tunes one, with a glue config) in a workdir, resuming '
              'from its latest checkpoint.'),
    'finetune': ('posjax.cli', 'Fine-tunes a pretrained posjax workdir or Hugging Face checkpoint on a GLUE task '
                 'or IMDB, on the same trainer and mesh as pretraining.'),
    'compare': ('posjax.compare', 'Trains several attention variants on the same data and seeds and tabulates '
                'their losses with error bars.'),
    'analyze': ('posjax.analysis.__main__', 'Writes the translation-invariance numbers, positional kernels and '
                'attention maps of a checkpoint as a summary and figures.'),
    'extrapolate': ('posjax.analysis.extrapolation', 'Scores pretrained models on sequences longer than they '
                    'were trained on.'),
    'export': ('posjax.convert.export', 'Writes a Hugging Face model directory, with its tokenizer, from a '
               'pretraining workdir.'),
    'plot': ('posjax.analysis.plot', 'Draws the loss and evaluation curves of a run as a PNG file.'),
    'aot': ('posjax.aot.cli', 'Compiles the train step for a TPU topology on this machine and reports memory, '
            'FLOPs, collectives and an estimated step time.'),
    'prepare': ('posjax.data.prepare', 'Prepares a corpus (local files or a tfds dataset) for pretraining, ahead '
                'of time.'),
}

TRAIN_HELP = '''Trains in WORKDIR, resuming from its latest checkpoint.

--config names a config of the package (bert, albert, electra, convbert, glue, with an argument after a colon:
bert:tiny,tisa) or a config file (configs/bert.py:tiny,tisa). Any field is overridden with
--config.FIELD=VALUE (for example --config.num_train_steps=2000 or --config.data.seq_len=256); a mistyped field
stops with a line naming the valid ones. A glue config fine-tunes; the others pretrain.'''


def quiet_tpu_probe() -> None:
  """With the libtpu wheel installed and no TPU attached, JAX's start-up probes for a TPU and prints
  notices; where the machine has no TPU device, the TPU platform is left out (the choice of the user's
  JAX_PLATFORMS stands). Call before JAX starts."""
  if os.environ.get('JAX_PLATFORMS'):
    return
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('libtpu') is None:
    return
  has_tpu = os.path.exists('/dev/accel0') or (os.path.isdir('/dev/vfio') and any(
      name.isdigit() for name in os.listdir('/dev/vfio')))
  if not has_tpu:
    gpu = any(importlib.util.find_spec(f'jax_plugins.{p}') for p in ('xla_cuda12', 'xla_cuda13', 'xla_rocm7')
              ) if importlib.util.find_spec('jax_plugins') else False
    os.environ['JAX_PLATFORMS'] = 'cuda,cpu' if gpu else 'cpu'
    if 'jax' in sys.modules:  # `import posjax` already imported jax, which read the variable then
      sys.modules['jax'].config.update('jax_platforms', os.environ['JAX_PLATFORMS'])


def setup_logging(prog: str) -> None:
  """absl logging at INFO on stderr, without what no reader needs: orbax's narration of every save, tfds's
  notices about preparing a local corpus (posjax logs its own line)."""
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS([prog])  # absl's own flags at their defaults (grain's workers read them too)
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not getattr(handler, '_posjax_filtered', False):
    handler.addFilter(lambda r: r.levelno >= logging.converter.STANDARD_WARNING or '/orbax/' not in r.pathname)
    handler.addFilter(lambda r: not any(m in r.getMessage() for m in QUIET))
    handler._posjax_filtered = True  # pylint: disable=protected-access


# tfds's messages about the local corpus builder, which posjax names itself.
QUIET = ('Using custom data configuration', 'has no dataset_info.json', 'Generating dataset local_corpus',
         'Done writing', 'Constructing tf.data.Dataset', 'Load dataset info from', 'Reusing dataset')


def _train_parser(prog: str, finetune: bool) -> argparse.ArgumentParser:
  from posjax.aot import cli as aot_cli  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog=prog, description=TRAIN_HELP,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', help='The directory for checkpoints, metrics and the tokenizer (required '
                      'unless --compile_only).')
  parser.add_argument('--config', default='glue:sst2' if finetune else None, required=not finetune,
                      help='The config: NAME[:ARG] of the package or FILE.py[:ARG].' + (
                          ' Default: glue:sst2.' if finetune else ''))
  aot_cli.add_arguments(parser, 'compile_only')  # the same as posjax aot --topology=TOPOLOGY
  return parser


def run(config, workdir: str) -> dict:
  """Fine-tuning for a config with a `task` (glue), else pretraining."""
  if 'task' in config:
    from posjax.finetune import finetuning  # pylint: disable=g-import-not-at-top
    return finetuning.run(config, workdir)
  from posjax.training import pretraining  # pylint: disable=g-import-not-at-top
  return pretraining.train_and_evaluate(config, workdir)


def train(argv: list[str], finetune: bool = False) -> int:
  """`posjax train` / `python train.py`: argv[0] is the program name."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from posjax import configs  # pylint: disable=g-import-not-at-top
  from posjax.aot import cli as aot_cli  # pylint: disable=g-import-not-at-top
  overrides = [a for a in argv[1:] if a.startswith('--config.')]
  args, rest = _train_parser(argv[0], finetune).parse_known_args([a for a in argv[1:] if a not in overrides])
  if rest:
    print(f'error: unexpected arguments: {" ".join(rest)} (flags take the form --name=value)', file=sys.stderr)
    return 2
  if args.compile_only:
    aot_cli.host_on_cpu()
  else:
    quiet_tpu_probe()
  try:
    config, _ = configs.from_argv([f'--config={args.config}', *overrides])
    if finetune and 'task' not in config:
      raise ConfigError(f'--config {args.config!r} is a pretraining config; fine-tuning takes glue:TASK')
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return e.exit_code
  config.lock()
  if args.compile_only:
    return aot_cli.run(config, args.compile_only, args.num_slices, args.find_max_batch, args.dump_hlo,
                       args.report_json)
  if args.workdir is None:
    print('error: --workdir is required (unless --compile_only=TOPOLOGY)', file=sys.stderr)
    return 2
  from posjax.training import host_memory, trainer  # pylint: disable=g-import-not-at-top
  setup_logging(argv[0])
  logging.info('%s', host_memory.keep_freed_memory())
  try:
    run(config, args.workdir)
  except trainer.Stopped as e:
    logging.warning('%s', e)
    return e.exit_code
  except Error as e:
    print(f'error: {e}', file=sys.stderr)
    return e.exit_code
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv
  parser = argparse.ArgumentParser(
      prog='posjax', description='posjax trains, fine-tunes, compares, analyses and exports transformer language '
      'models with the position mechanisms of Chang et al. 2021, Wennberg & Henter 2021 and ConvBERT.',
      epilog='Run `posjax COMMAND --help` for the arguments of a command.')
  sub = parser.add_subparsers(dest='command', metavar='COMMAND')
  for name, (_, text) in COMMANDS.items():
    sub.add_parser(name, help=text, add_help=False)
  if len(argv) < 2 or argv[1] in ('-h', '--help'):
    parser.print_help()
    return 0 if len(argv) >= 2 else 2
  command, rest = argv[1], argv[2:]
  if command not in COMMANDS:
    print(f'error: unknown command {command!r}; commands: {", ".join(COMMANDS)}', file=sys.stderr)
    return 2
  if command in ('train', 'finetune'):  # picks the platforms once it knows whether it only compiles
    return train([f'posjax {command}', *rest], finetune=command == 'finetune')
  if command == 'aot':
    from posjax.aot import cli as aot_cli  # pylint: disable=g-import-not-at-top
    aot_cli.host_on_cpu()
  else:
    quiet_tpu_probe()
  module = importlib.import_module(COMMANDS[command][0])
  if command == 'prepare':  # an absl program
    from absl import app  # pylint: disable=g-import-not-at-top
    try:
      app.run(module.main, argv=[f'posjax {command}', *rest])
    except SystemExit as e:
      return e.code if isinstance(e.code, int) else 0
    return 0
  return module.main(rest)


if __name__ == '__main__':
  sys.exit(main())
