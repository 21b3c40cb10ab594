"""The ahead-of-time compile's command line: `posjax aot` (`python -m posjax.aot`) and `posjax train
--compile_only=TOPOLOGY` (`python train.py --compile_only=...`) share `add_arguments` and `run`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from posjax.errors import ConfigError

DESCRIPTION = '''Compiles the train step of --config for a TPU slice on this machine, with the TPU compiler in libtpu
(no TPU needed), or for one host's GPUs with XLA's GPU compiler (JAX's CUDA plugin installed, no GPU needed),
and reports per chip: memory against HBM, HLO FLOPs and bytes, a roofline step time and
estimated MFU, the collectives and their ICI traffic, the compile time and the compiler's warnings. The step
is the trainer's own, with config.mesh laid over the slice's chips; --config.FIELD=VALUE overrides any field
as for posjax train.'''


def host_on_cpu() -> None:
  """The compile targets the topology's devices; JAX itself runs on this host's CPU (JAX_PLATFORMS, when
  given, stands): with libtpu installed it would otherwise probe for a TPU at start-up, and JAX's CUDA plugin
  would look for a GPU driver. Call before JAX starts (`import posjax` imports jax, which has read the
  variable by then, so the choice also goes to jax.config)."""
  if os.environ.get('JAX_PLATFORMS'):
    return
  os.environ['JAX_PLATFORMS'] = 'cpu'
  if 'jax' in sys.modules:
    sys.modules['jax'].config.update('jax_platforms', 'cpu')


def add_arguments(parser: argparse.ArgumentParser, topology_flag: str) -> None:
  parser.add_argument(f'--{topology_flag}', required=topology_flag == 'topology',
                      help='A TPU slice (v5e-64, v4-32, v5p-128, v6e-8, ...), chip grid (v5e:4x8, v4:2x2x4) or '
                      'GPU host (h100-8, h200-1, ...) to compile the train step for.')
  parser.add_argument('--num_slices', type=int, default=1, help='The number of slices joined by the data-centre '
                      'network (DCN); the mesh\'s data axis spans them.')
  parser.add_argument('--find_max_batch', action='store_true', help='Searches the largest global batch that fits '
                      '(multiples of grad_accum_steps times the mesh axes the batch is split over) and reports at it.')
  parser.add_argument('--dump_hlo', default=None, help='A directory for the lowered StableHLO, the optimised HLO '
                      'and the report as JSON.')
  parser.add_argument('--report_json', default=None, help="Writes the report as JSON to this file ('-': stdout).")


def main(argv: list[str]) -> int:
  """`posjax aot ARGS` (argv without the program name)."""
  from posjax import configs  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='posjax aot', description=DESCRIPTION)
  parser.add_argument('--config', required=True, help='The config: NAME[:ARG] of the package or FILE.py[:ARG].')
  add_arguments(parser, 'topology')
  overrides = [a for a in argv if a.startswith('--config.')]
  args, rest = parser.parse_known_args([a for a in argv if a not in overrides])
  if rest:
    print(f'error: unexpected arguments: {" ".join(rest)}', file=sys.stderr)
    return 2
  try:
    config, _ = configs.from_argv([f'--config={args.config}', *overrides])
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return run(config, args.topology, args.num_slices, args.find_max_batch, args.dump_hlo, args.report_json)


def _gib(x: float) -> str:
  return f'{x / 2 ** 30:.3f}'


def format_report(r: dict) -> str:
  """The report as the table a terminal shows."""
  m, b, d, mo = r['model'], r['batch'], r['devices'], r['memory_per_chip']
  mesh = ' '.join(f'{k}={v}' for k, v in r['mesh'].items())
  lines = [
      f'{m["type"]} ({m["attention"]}, objective {m["objective"]}): {m["layers"]} layers, width {m["hidden"]}, '
      f'{m["parameters"] / 1e6:.1f}M parameters, {m["dtype"]}, scan_layers={m["scan_layers"]}, '
      f'remat {m["remat_policy"]}',
      f'batch {b["size"]} x {b["seq_len"]} tokens ({b["predictions"]} predictions per row), grad_accum_steps '
      f'{b["grad_accum_steps"]} (batch sizes: multiples of {b["divisor"]})',
      f'{d["topology"] or "devices"}: {d["count"]} x {d["kind"]}' + (f' in {d["slices"]} slices' if d['slices'] > 1
                                                                    else '') + f', mesh {mesh}',
      f'compiled in {r["compile_s"]:.1f} s (lowered in {r["lower_s"]:.1f} s)',
      '',
      'memory per chip (GiB)',
  ]
  for key, label in (('argument', 'arguments'), ('output', 'outputs'), ('alias', 'aliased (donated, counted once)'),
                     ('temp', 'temporaries'), ('generated_code', 'generated code')):
    lines.append(f'  {label:<34}{("-" if key == "alias" else " ") + _gib(mo[key]):>10}')
  total = f'  {"total":<34} {_gib(mo["total"]):>9}'
  if 'hbm' in mo:
    verdict = (f'fits, {_gib(mo["margin"])} GiB to spare' if mo['fits'] else
               f'DOES NOT FIT by {_gib(-mo["margin"])} GiB')
    total += f'  of {_gib(mo["hbm"])} HBM: {verdict}'
  lines += [total, '', 'per chip and step']
  lines.append(f'  HLO FLOPs            {r["hlo_flops_per_chip"]:.3e}  (matmuls {r["hlo_matmul_flops_per_chip"]:.3e}; '
               f'model FLOPs {r["model_flops_per_chip"]:.3e}, HLO matmuls / model '
               f'{r["hlo_matmul_over_model_flops"]:.3f})')
  lines.append(f'  HLO bytes accessed   {r["hlo_bytes_accessed_per_chip"]:.3e}')
  if r.get('costs_from') == 'hlo text':
    lines.append('  (the compiler gave no cost analysis: FLOPs of the HLO\'s matmuls, none inside kernels, so the '
                 'roofline below is a lower bound)')
  if 'roofline' in r:
    rl = r['roofline']
    lines.append(f'  roofline step time   {rl["step_s"] * 1e3:.2f} ms ({rl["bound"]}-bound: compute '
                 f'{rl["compute_s"] * 1e3:.2f} ms, HBM {rl["memory_s"] * 1e3:.2f} ms, ICI {rl["ici_s"] * 1e3:.2f} ms)')
    lines.append(f'  estimated MFU        {100 * rl["mfu"]:.1f}% (model FLOPs / (step time x '
                 f'{rl["peak_flops"] / 1e12:.0f} TFLOP/s))')
  lines += ['', f'collectives per step  {"count":>7} {"MiB":>10} {"ICI MiB sent":>13}' +
            (f' {"DCN MiB sent":>13}' if d['slices'] > 1 else '')]
  for kind, s in r['collectives'].items():
    lines.append(f'  {kind:<19}{s["count"]:>7} {s["bytes"] / 2 ** 20:>10.2f} {s["ici_traffic"] / 2 ** 20:>13.2f}'
                 + (f' {s["dcn_traffic"] / 2 ** 20:>13.2f}' if d['slices'] > 1 else ''))
  if r['warnings']:
    lines += ['', f'compiler warnings ({len(r["warnings"])}):'] + [f'  {w}' for w in r['warnings']]
  else:
    lines += ['', 'compiler warnings: none (no involuntary rematerialisation)']
  return '\n'.join(lines)


def run(config, topology_spec: str, num_slices: int = 1, find_max_batch: bool = False, dump_hlo: str | None = None,
        report_json: str | None = None) -> int:
  """Compiles, prints the report (and writes what was asked for); returns the exit code. Bad input: one
  `error:` line and 2."""
  from posjax.aot import compile as compile_lib  # pylint: disable=g-import-not-at-top
  from posjax.aot import topology  # pylint: disable=g-import-not-at-top
  from posjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  try:
    topo = topology.parse(topology_spec, num_slices)
    devices = topology.devices(topo)
    if find_max_batch:
      compiled, tried = compile_lib.find_max_batch(config, devices, topo.chip, log=print)
      print(f'largest global batch that fits: {compiled.config.batch_size} (tried '
            f'{", ".join(map(str, tried))})\n')
    else:
      compiled = compile_lib.compile_train_step(config, devices)
    report = compile_lib.report(compiled, topo.chip, topo.name)
    if dump_hlo:
      compile_lib.dump(compiled, dump_hlo, report)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_report(report))
  if report_json == '-':
    print(json.dumps(report, indent=1))
  elif report_json:
    with open(report_json, 'w') as f:
      json.dump(report, f, indent=1)
  return 0
