"""Compile posjax's train step for a TPU topology on this host (no TPU needed) and report per chip.

    python -m posjax.aot --config=configs/bert.py:large,tisa --topology=v5e-64 [--num_slices=2]
        [--find_max_batch] [--dump_hlo=DIR] [--report_json=FILE] [--config.FIELD=VALUE ...]

The step is the trainer's own (`train.py --compile_only=TOPOLOGY` does the same): `config.mesh` laid over
the topology's chips, the state and batch shardings, optimizer update, gradient accumulation, scan/remat and
compute dtype as configured. The report: memory per chip against HBM, HLO FLOPs and bytes, a roofline step
time and estimated MFU, the collectives with their ICI traffic, compile time, and the compiler's warnings.
Needs libtpu (posjax's `test` extra installs it); run with JAX_PLATFORMS=cpu.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from posjax import cli
from posjax.aot import cli as aot_cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'A config file, optionally with an argument: FILE.py:ARG.',
                                lock_config=True)
aot_cli.define_flags('topology')
flags.mark_flags_as_required(['config', 'topology'])


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments: {" ".join(argv[1:])} (flags take the form --name=value)')
  sys.exit(aot_cli.run(FLAGS.config, FLAGS.topology, FLAGS.num_slices, FLAGS.find_max_batch, FLAGS.dump_hlo,
                       FLAGS.report_json))


if __name__ == '__main__':
  cli.check_config_args(sys.argv)
  app.run(main)
