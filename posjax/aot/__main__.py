"""Compile posjax's train step for a TPU topology or a GPU host on this host (no TPU/GPU needed); report per chip.

    python -m posjax.aot --config=bert:large,tisa --topology=v5e-64 [--num_slices=2]
    python -m posjax.aot --config=bert:base,tisa --topology=h100-8
        [--find_max_batch] [--dump_hlo=DIR] [--report_json=FILE] [--config.FIELD=VALUE ...]

The step is the trainer's own (`train.py --compile_only=TOPOLOGY` does the same): `config.mesh` laid over
the topology's chips, the state and batch shardings, optimizer update, gradient accumulation, scan/remat and
compute dtype as configured. The report: memory per chip against HBM, HLO FLOPs and bytes, a roofline step
time and estimated MFU, the collectives with their ICI traffic, compile time, and the compiler's warnings.
Needs libtpu for TPUs (posjax's `test` extra installs it), JAX's CUDA plugin for GPUs (`pip install
'jax[cuda12]'`); JAX runs on the CPU (JAX_PLATFORMS=cpu is set unless given).
"""

import sys

if __name__ == '__main__':
  from posjax.aot import cli  # pylint: disable=g-import-not-at-top
  cli.host_on_cpu()
  sys.exit(cli.main(sys.argv[1:]))
