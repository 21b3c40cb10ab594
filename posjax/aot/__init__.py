"""Ahead-of-time compilation of the train step for TPU topologies on any host (libtpu compiles for a TPU it
does not have): `python -m posjax.aot --config=... --topology=v5e-64`, or `train.py --compile_only=...`.

- `topology`: TPU generations, slice names -> compile-only devices, chip figures;
- `compile`: the trainer's jitted step compiled over them, its report, the largest batch that fits;
- `hlo`: collectives, loop-aware FLOPs and bytes from the optimised HLO; the compiler's log;
- `flops`: the model-FLOPs formula behind MFU;
- `cli`: the command line shared by both entry points.
"""
