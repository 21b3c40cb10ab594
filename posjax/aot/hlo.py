"""Reading a compiled program: its collectives (from the optimised HLO text) and the compiler's log.

XLA writes the SPMD partitioner's warnings ("[SPMD] Involuntary full rematerialization ...") through its C++
logging straight to file descriptor 2, where Python cannot intercept them; `captured_stderr` redirects the
descriptor itself for the duration of a compile.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import time

import numpy as np

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2, 'f16': 2,
                'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\]')
_HEADER = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*?)\s+([\w\-]+)\((.*)$')
_CALLED = re.compile(r'\b(calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)')
_CALLED_LISTS = re.compile(r'\b(?:branch_computations|called_computations)=\{([^}]*)\}')


def _instructions(lines: list[str]):
  """(target, result shape, op, the rest of the line) of each instruction among a computation's lines."""
  for line in lines:
    m = _INSTRUCTION.match(line)
    if m:
      yield m.groups()


def array_bytes(shape_text: str) -> list[int]:
  """Bytes of each array in an HLO shape (`bf16[64,128]{0,1:T(8,128)}`, or a tuple of them)."""
  return [_DTYPE_BYTES[t] * math.prod(int(d) for d in dims.split(',') if d) for t, dims in
          _ARRAY.findall(re.sub(r'\{[^{}]*\}', '', shape_text))]


def replica_groups(attrs: str, num_partitions: int) -> np.ndarray:
  """The collective's device groups as a GxS array of partition ids: `{{0,1},{2,3}}` or the iota form
  `[G,S]<=[dims]T(perm)`; empty braces mean one group of all partitions."""
  m = re.search(r'replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', attrs)
  if m:
    shape = [int(x) for x in m.group(1).split(',')]
    dims = [int(x) for x in m.group(2).split(',')]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(',')])
    return ids.reshape(shape[0], -1)
  m = re.search(r'replica_groups=\{(\{[\d,{} ]*\})?\}', attrs)
  if m and m.group(1):
    groups = [[int(x) for x in g.split(',') if x.strip()] for g in re.findall(r'\{([\d, ]*)\}', m.group(1))]
    if groups and all(len(g) == len(groups[0]) for g in groups):
      return np.array(groups)
  return np.arange(num_partitions)[None]


@dataclasses.dataclass
class Collective:
  kind: str  # one of COLLECTIVES
  bytes: int  # of the array each device holds after it (all-gather: the gathered whole)
  group: int  # devices per group
  runs: int  # executions per step (loop trip counts)
  crosses_slices: bool  # between TPU slices: the data-centre network (DCN) carries it

  @property
  def traffic(self) -> float:
    """Bytes each device sends per execution, for ring algorithms over `group` devices."""
    n, b = self.group, self.bytes
    return {'all-gather': b * (n - 1) / n, 'reduce-scatter': b * (n - 1), 'all-reduce': 2 * b * (n - 1) / n,
            'all-to-all': b * (n - 1) / n, 'collective-permute': b}[self.kind]


def _computations(text: str) -> tuple[dict[str, list[str]], str | None]:
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    m = _HEADER.match(line)
    if m:
      current = m.group(1)
      comps[current] = []
      if line.startswith('ENTRY'):
        entry = current
    elif current is not None and line.startswith('}'):
      current = None
    elif current is not None:
      comps[current].append(line)
  return comps, entry


_SCALAR = r'%([\w.\-]+) = [su]32\[\][^=]*'


def _trip_count(while_line: str, comps: dict[str, list[str]], condition: str, body: str | None = None) -> int:
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', while_line)
  if m:
    return int(m.group(1))
  # jax's loops (scan, fori_loop) count an s32 induction variable from 0 while it is below a constant, by 1;
  # the TPU compiler's windowed (collective) matmuls under FSDP count a u32 one, by 2 where they run both ways
  # round the ring: the step is the constant the body adds to the tuple element the condition compares.
  cond = '\n'.join(comps.get(condition, ()))
  consts = [int(c) for _, c in re.findall(_SCALAR + r'constant\((\d+)\)', cond)]
  if len(consts) != 1:
    return 1
  limit, step = consts[0], 1
  compared = re.search(r'compare\(%([\w.\-]+), %[\w.\-]+\), direction=LT', cond)
  index = re.search(re.escape(compared.group(1)) + r' = [su]32\[\][^=]*get-tuple-element\([^)]*\), index=(\d+)',
                    cond) if compared else None
  if index is not None and body in comps:
    text = '\n'.join(comps[body])
    values = dict(re.findall(_SCALAR + r'constant\((\d+)\)', text))
    element = re.findall(_SCALAR + r'get-tuple-element\([^)]*\), index=' + index.group(1) + r'\b', text)
    for name in element:
      for a, b in re.findall(r'add\(%' + re.escape(name) + r', %([\w.\-]+)\)|add\(%([\w.\-]+), %' +
                             re.escape(name) + r'\)', text):
        other = a or b
        if other in values:
          step = int(values[other])
  return -(-limit // step)


def runs_per_step(text: str) -> tuple[dict[str, int], dict[str, list[str]]]:
  """How often each computation of the module runs per call of the entry computation (while bodies count
  their trip counts, nested loops multiply; every branch of a conditional counts once)."""
  comps, entry = _computations(text)
  runs = collections.Counter()

  def visit(name, times):
    runs[name] += times
    for line in comps.get(name, ()):
      called = _CALLED.findall(line)
      if not called and 'computations={' not in line:
        continue
      trips = 1
      if ' while(' in line:
        cond = next((c for k, c in called if k == 'condition'), None)
        body = next((c for k, c in called if k == 'body'), None)
        trips = _trip_count(line, comps, cond, body)
      for kind, callee in called:
        if callee in comps and kind != 'condition':
          visit(callee, times * (trips if kind == 'body' else 1))
      for group in _CALLED_LISTS.findall(line):
        for callee in re.findall(r'%?([\w.\-]+)', group):
          if callee in comps:
            visit(callee, times)

  if entry is not None:
    visit(entry, 1)
  return dict(runs), comps


def collectives(text: str, num_slices: int = 1) -> list[Collective]:
  """The collectives of an optimised HLO module, one per operation (the TPU compiler splits an asynchronous
  collective over several fusions sharing its channel id), with their executions per step.

  A multi-slice program is one slice's: its collectives stay within the slice (ICI), and what crosses the
  data-centre network between the `num_slices` slices are sends to the megascale runtime, tagged with the
  collective they implement (`_xla_megascale_transfer_type`)."""
  runs, comps = runs_per_step(text)
  m = re.search(r'num_partitions=(\d+)', text)
  num_partitions = int(m.group(1)) if m else 1
  seen, out = set(), []
  for name, lines in comps.items():
    if not runs.get(name):
      continue
    for target, shape, op, rest in _instructions(lines):
      dcn = re.search(r'_xla_megascale_transfer_type="(\w+)"', rest) if op == 'send' else None
      if dcn:
        kind = dcn.group(1).lower().replace('_', '-')
        rendezvous = re.search(r'_xla_host_transfer_rendezvous="([^"]*)"', rest)
        key = ('dcn', rendezvous.group(1) if rendezvous else target)
        if kind not in COLLECTIVES or key in seen:
          continue
        seen.add(key)
        out.append(Collective(kind, array_bytes(shape)[0], num_slices, runs[name], True))
        continue
      kind = op[:-len('-start')] if op.endswith('-start') else op
      if kind not in COLLECTIVES:
        continue
      channel = re.search(r'channel_id=(\d+)', rest)
      key = ('channel', channel.group(1)) if channel else ('op', name, target)
      if key in seen:
        continue
      seen.add(key)
      sizes = array_bytes(shape)
      if op.endswith('-start') and kind in ('all-gather', 'collective-permute'):
        sizes = sizes[len(sizes) // 2:]  # (operands..., results...): the results
        sizes = sizes[:1] if kind == 'collective-permute' else sizes
      group = 2 if kind == 'collective-permute' else replica_groups(rest, num_partitions).shape[1]
      out.append(Collective(kind, sum(sizes), group, runs[name], False))
  return out


def summarise(found: list[Collective]) -> dict[str, dict[str, float]]:
  """{kind: {count, bytes, ici_traffic, dcn_count, dcn_traffic}} per step and device, every kind listed;
  `count` and `bytes` include the DCN ones."""
  out = {k: dict(count=0, bytes=0, ici_traffic=0.0, dcn_count=0, dcn_traffic=0.0) for k in COLLECTIVES}
  for c in found:
    s = out[c.kind]
    s['count'] += c.runs
    s['bytes'] += c.bytes * c.runs
    if c.crosses_slices:
      s['dcn_count'] += c.runs
      s['dcn_traffic'] += c.traffic * c.runs
    else:
      s['ici_traffic'] += c.traffic * c.runs
  return out


def _dims(shape_text: str) -> tuple[int, ...]:
  m = _ARRAY.search(re.sub(r'\{[^{}]*\}', '', shape_text))
  return tuple(int(d) for d in m.group(2).split(',') if d) if m else ()


def _operands(args: str) -> list[str]:
  return re.findall(r'%?([\w.\-]+)', args.split(')', 1)[0])


def _window(attrs: str, rank: int) -> list[dict[str, int]]:
  m = re.search(r'window=\{([^}]*)\}', attrs)
  fields = dict(kv.split('=', 1) for kv in m.group(1).split()) if m else {}
  dims = [dict(size=1, stride=1, lo=0, hi=0, lhs_dilate=1, rhs_dilate=1) for _ in range(rank)]
  for key in ('size', 'stride', 'lhs_dilate', 'rhs_dilate'):
    for d, v in zip(dims, fields.get(key, '').split('x') if key in fields else ()):
      d[key] = int(v)
  if 'pad' in fields:
    for d, v in zip(dims, fields['pad'].split('x')):
      d['lo'], d['hi'] = (int(x) for x in v.split('_'))
  return dims


def _taps(n: int, outputs: int, w: dict[str, int]) -> int:
  """Multiply-adds along one spatial dimension of a convolution, summed over its outputs: window positions
  that land on a real input element (the TPU compiler writes batched matmuls as convolutions over an
  lhs-dilated dimension, where a window of `size` holds a single real element)."""
  real = set(w['lo'] + w['lhs_dilate'] * j for j in range(n))
  return sum(o * w['stride'] + t * w['rhs_dilate'] in real for o in range(outputs) for t in range(w['size']))


def _matmul_flops(op: str, shape: str, rest: str, shapes: dict[str, str]) -> float:
  out = _dims(shape)
  names = _operands(rest)
  if op == 'dot':
    lhs = _dims(shapes.get(names[0], ''))
    m = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', rest)
    if not lhs or not m:
      return 0.0
    return 2.0 * math.prod(out) * math.prod(lhs[int(i)] for i in m.group(1).split(',') if i)
  labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', rest)
  lhs, rhs = _dims(shapes.get(names[0], '')), _dims(shapes.get(names[1], ''))
  if not labels or not lhs or not rhs:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  spatial = sorted(c for c in rhs_l if c.isdigit())
  window = _window(rest, len(spatial))
  macs = math.prod(out[out_l.index(c)] for c in 'bf') * rhs[rhs_l.index('i')]
  for k, c in enumerate(spatial):
    macs *= _taps(lhs[lhs_l.index(c)], out[out_l.index(c)], window[k])
  return 2.0 * macs


_NO_TRAFFIC = ('parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'while', 'conditional', 'call',
               'after-all', 'opt-barrier', 'partition-id', 'replica-id')


def _sliced_operands(lines: list[str]) -> dict[int, tuple[int, int]]:
  """For a computation's parameters used only as the array a dynamic slice reads or a dynamic update slice
  writes into (a scan's stacked per-layer buffers, updated in place): {parameter number: (bytes read of it,
  bytes its in-place update writes)}. Those instructions touch a slice of the array, not all of it."""
  params, uses, shapes = {}, collections.defaultdict(list), {}
  for target, shape, op, rest in _instructions(lines):
    shapes[target] = shape
    if op == 'parameter':
      params[target] = int(re.match(r'(\d+)', rest).group(1))
      continue
    for i, o in enumerate(_operands(rest)):
      uses[o].append((op, i, target))
  out = {}
  for name, number in params.items():
    u = uses.get(name, [])
    if u and all(op in ('dynamic-slice', 'dynamic-update-slice') and i == 0 for op, i, _ in u):
      read = sum(sum(array_bytes(shapes[t])) for op, _, t in u if op == 'dynamic-slice')
      written = sum(sum(array_bytes(shapes.get(_operands_of(lines, t)[1], ''))) for op, _, t in u
                    if op == 'dynamic-update-slice')
      out[number] = (read, written)
  return out


def _operands_of(lines: list[str], target: str) -> list[str]:
  for name, _, _, rest in _instructions(lines):
    if name == target:
      return _operands(rest)
  return []


def _traffic(op: str, shape: str, rest: str, shapes: dict[str, str], comps: dict[str, list[str]]) -> int:
  """Bytes an instruction outside fusions reads and writes: its operands and result, except that dynamic
  slices read, and in-place dynamic update slices write, only their slice (also inside fusions)."""
  names = _operands(rest)
  sizes = [sum(array_bytes(shapes.get(o, ''))) for o in names]
  result = sum(array_bytes(shape))
  if op == 'dynamic-slice':
    return 2 * result
  if op == 'dynamic-update-slice':
    return 2 * (sizes[1] if len(sizes) > 1 else result)
  if op == 'fusion':
    callee = next((c for k, c in _CALLED.findall(rest) if k == 'calls'), None)
    for number, (read, written) in _sliced_operands(comps.get(callee, [])).items():
      if number < len(sizes):
        if written:  # the buffer is updated in place: its slice written, not the whole array out
          result -= sizes[number] - written
        sizes[number] = read
  return max(result, 0) + sum(sizes)


def costs(text: str) -> dict[str, float]:
  """Per device and step, from an optimised HLO module: `matmul_flops` of its dot and convolution
  instructions and `bytes` that the instructions outside fusions read and write, each computation counted as
  often as it runs; `*_once` count each computation once, as XLA's cost analysis does (a scanned encoder's
  layers then count once), so that `x / x_once` corrects its figures for loops."""
  runs, comps = runs_per_step(text)
  fused = {callee for lines in comps.values() for line in lines if ' fusion(' in line
           for kind, callee in _CALLED.findall(line) if kind == 'calls'}
  out = dict(matmul_flops=0.0, matmul_flops_once=0.0, bytes=0.0, bytes_once=0.0)
  for name, lines in comps.items():
    times = runs.get(name, 0)
    if not times:
      continue
    shapes = {}
    for target, shape, op, rest in _instructions(lines):
      shapes[target] = shape
      if op in ('dot', 'convolution'):
        f = _matmul_flops(op, shape, rest, shapes)
        out['matmul_flops'] += times * f
        out['matmul_flops_once'] += f
      if name not in fused and op not in _NO_TRAFFIC and not op.endswith('-done'):
        b = _traffic(op, shape, rest, shapes, comps)
        out['bytes'] += times * b
        out['bytes_once'] += b
  return out


INVOLUNTARY_REMAT = 'Involuntary full rematerialization'
COMPILER_REMAT = 'by rematerialization'


def warnings(log: list[str]) -> list[str]:
  """The lines of a compiler log that a user should see: the SPMD partitioner's (a sharding that forces a full
  replica) and those of the pass that recomputes activations to fit the HBM ("Can't reduce memory use below
  ... by rematerialization"): near the largest batch that fits, its recomputation can add most of a step's
  FLOPs."""
  return [line.strip() for line in log if '[SPMD]' in line or INVOLUNTARY_REMAT in line or COMPILER_REMAT in line]


@contextlib.contextmanager
def captured_stderr():
  """Everything written to file descriptor 2 inside the block (XLA's C++ log included), as a list of lines
  filled in on exit; nothing of it reaches the terminal."""
  sys.stderr.flush()
  saved = os.dup(2)
  lines: list[str] = []
  with tempfile.TemporaryFile() as f:
    os.dup2(f.fileno(), 2)
    try:
      yield lines
    finally:
      time.sleep(0.2)  # libtpu logs from a thread of its own
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      f.seek(0)
      lines.extend(f.read().decode(errors='replace').splitlines())
