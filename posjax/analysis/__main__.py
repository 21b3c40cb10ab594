"""python -m posjax.analysis --checkpoint DIR --out DIR [--length N] [--sentence TEXT]

DIR is a posjax training workdir or a Hugging Face BERT/ALBERT/ELECTRA/ConvBERT checkpoint directory. Writes
summary.json and PNG figures to --out and prints the translation-invariance numbers."""

from __future__ import annotations

import argparse
import sys

from posjax.errors import ConfigError


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog='python -m posjax.analysis', description=__doc__.splitlines()[2])
  ap.add_argument('--checkpoint', required=True, help='posjax workdir or Hugging Face checkpoint directory')
  ap.add_argument('--out', required=True, help='directory for summary.json and the PNG figures')
  ap.add_argument('--length', type=int, default=64, help='positions analysed (default 64)')
  ap.add_argument('--sentence', default=None, help='text whose attention maps are drawn')
  args = ap.parse_args(argv)
  if args.length < 2:
    ap.error(f'--length must be at least 2; got {args.length}')
  from posjax import analysis  # pylint: disable=g-import-not-at-top  (keeps --help fast)
  from posjax.analysis import report  # pylint: disable=g-import-not-at-top
  try:
    ck = analysis.load(args.checkpoint)
    s = report.analyze(ck, args.out, args.length, args.sentence or report.DEFAULT_SENTENCE,
                       log=lambda line: print(f'[analysis] {line}', file=sys.stderr, flush=True))
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(report.format_summary(s))
  return 0


if __name__ == '__main__':
  from posjax import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_tpu_probe()
  sys.exit(main())
