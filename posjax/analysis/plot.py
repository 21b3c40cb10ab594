"""python -m posjax.analysis.plot RUN_DIR [--out PNG]

Draws one run's curves from its metrics.jsonl: the training loss (and its parts, e.g. ELECTRA's generator
and discriminator losses) with the held-out losses, the other metrics (training accuracy, every eval_*
metric: held-out MLM accuracy, a GLUE task's dev metrics) and the learning rate, against the step. Writes
RUN_DIR/loss_curves.png unless --out says where. Works for pretraining and fine-tuning workdirs alike.
"""

from __future__ import annotations

import argparse
import os
import sys

from posjax.errors import ConfigError

FILE = 'loss_curves.png'


def plot(run_dir: str, out: str = '') -> str:
  """Writes the figure of `run_dir` to `out` (default RUN_DIR/loss_curves.png); returns its path."""
  from posjax.analysis import plots  # pylint: disable=g-import-not-at-top  (matplotlib: keeps --help fast)
  from posjax.training import metrics  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(run_dir):
    raise ConfigError(f'RUN_DIR {run_dir!r} is not a directory')
  rows = metrics.read(run_dir)
  if not rows:
    below = sorted(d for d in os.listdir(run_dir) if os.path.exists(os.path.join(run_dir, d, 'metrics.jsonl')))
    hint = (f'; its runs are in {", ".join(os.path.join(run_dir, d) for d in below)}' if below else
            ' (has the run logged a step yet?)')
    raise ConfigError(f'RUN_DIR {run_dir!r} has no metrics in metrics.jsonl{hint}')
  title = f'{os.path.basename(os.path.normpath(run_dir))}: step {rows[-1]["step"]}'
  return plots.run_curves(rows, out or os.path.join(run_dir, FILE), title)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog='python -m posjax.analysis.plot',
                               description="Draws a run's losses, metrics and learning rate from its "
                                           'metrics.jsonl as one PNG.')
  ap.add_argument('run_dir', metavar='RUN_DIR', help='A posjax training workdir, of pretraining or fine-tuning.')
  ap.add_argument('--out', default='', help=f'The PNG file to write; RUN_DIR/{FILE} by default.')
  args = ap.parse_args(argv)
  try:
    path = plot(args.run_dir, args.out)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  from posjax import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_tpu_probe()
  sys.exit(main())
