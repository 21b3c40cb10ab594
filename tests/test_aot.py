"""posjax.aot: the trainer's train step compiled for TPU topologies on this CPU host by libtpu.

Shapes are small (two scanned layers, width 512 so that every shard is a whole number of TPU tiles); each
compile takes seconds, and tests share them."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, load_config_module
from posjax import configs
from posjax.errors import ConfigError

pytest.importorskip('libtpu', reason='the AOT compile needs libtpu (installed with the test extra)')

from posjax.aot import compile as compile_lib  # noqa: E402
from posjax.aot import hlo, topology  # noqa: E402


def small_config(name='bert', variant=None, mesh=(1, 1, 1), **overrides):
  """Two scanned bfloat16 layers of width 512 (128 per device under 4-way FSDP or TP: whole TPU tiles)."""
  size = {'bert': 'tiny', 'albert': 'tiny', 'electra': 'tiny', 'convbert': 'tiny'}[name]
  c = load_config_module(name).get_config(f'{size},{variant}' if variant else size)
  # ConvBERT: 8 heads, of which its convolution takes 4 (tensor parallelism splits both kinds).
  c.model.update(hidden_size=512, num_heads=8 if name == 'convbert' else 4, intermediate_size=512, num_layers=2,
                 vocab_size=1024, dtype='bfloat16', scan_layers=True, hidden_dropout=0.0, attention_dropout=0.0)
  if c.model.embedding_size:
    c.model.embedding_size = 256
  c.electra.generator_fraction = 1.0  # the generator keeps 4 heads: tensor parallelism splits them
  c.data.seq_len, c.batch_size = 32, 16
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  for k, v in overrides.items():
    configs.override(c, k, v)
  return c


@pytest.fixture(scope='module')
def devices():
  cache = {}

  def get(spec, num_slices=1):
    key = (spec, num_slices)
    if key not in cache:
      topo = topology.parse(spec, num_slices)
      cache[key] = (topo, topology.devices(topo))
    return cache[key]
  return get


@pytest.mark.parametrize('spec, grid, chips', [
    ('v5e-64', (8, 8), 64), ('v5litepod-16', (4, 4), 16), ('v5e-8', (2, 4), 8), ('v5e-1', (1, 1), 1),
    ('v4-32', (2, 2, 4), 16), ('v4-8', (2, 2, 1), 4), ('v4-128', (4, 4, 4), 64), ('v5p-64', (2, 4, 4), 32),
    ('v5p-8', (2, 2, 1), 4), ('v6e-256', (16, 16), 256), ('v6e-4', (2, 2), 4), ('v5e:4x8', (4, 8), 32),
    ('v4:2x2x2', (2, 2, 2), 8)])
def test_slice_names_give_cloud_tpu_shapes(spec, grid, chips):
  topo = topology.parse(spec)
  assert topo.grid == grid and topo.chips == chips


@pytest.mark.parametrize('spec, message', [
    ('v7x-8', "unknown chip 'v7x'"), ('v5e-6', 'no such slice; v5e slices are v5e-1, v5e-4'),
    ('v4-6', 'v4/v5p names count TensorCores'), ('v5e:2x2x2', 'a v5e chip grid has 2 positive axes'),
    ('bogus', 'expected a slice name such as v5e-64')])
def test_bad_topology_names_are_one_line(spec, message):
  with pytest.raises(ConfigError, match=message):
    topology.parse(spec)


def test_devices_are_one_per_chip_and_slices_are_marked(devices):
  _, v4 = devices('v4-32')
  assert len(v4) == 16 and {d.device_kind for d in v4} == {'TPU v4'}  # megacore: one device per chip
  _, two = devices('v5e-4', 2)
  assert len(two) == 8 and sorted({d.slice_index for d in two}) == [0, 1]


def test_multislice_mesh_puts_the_data_axis_across_slices(devices):
  from posjax.training import sharding
  _, devs = devices('v5e-4', 2)
  mesh = sharding.make_mesh(dict(data=4, fsdp=2, tensor=1), devs)
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slice_of[:2] == 0).all() and (slice_of[2:] == 1).all()  # each slice: half the data axis, all of fsdp
  with pytest.raises(ConfigError, match='data axis .1. must be a multiple of the number of slices'):
    sharding.make_mesh(dict(data=1, fsdp=8, tensor=1), devs)


def check_flops(r, mesh):
  """The model-FLOPs formula counts the matrix products the HLO holds (scanned layers, no remat) to 2%. Under
  tensor parallelism each chip also repeats the few products whose weights the tensor axis does not split
  (the MLM head's D x E transform, the embedding projection, the pooler): up to 12% more here."""
  assert 0.98 <= r['hlo_matmul_over_model_flops'] <= (1.12 if mesh[2] > 1 else 1.02)


@pytest.fixture(scope='module')
def compiled(devices):
  """(Compiled, report) of small_config(name, mesh, overrides) for a topology, compiled once per module."""
  cache = {}

  def get(spec, name='bert', mesh=(1, 1, 1), num_slices=1, **overrides):
    key = (spec, name, mesh, num_slices, tuple(sorted(overrides.items())))
    if key not in cache:
      topo, devs = devices(spec, num_slices)
      c = compile_lib.compile_train_step(small_config(name, None, mesh, **overrides), devs)
      cache[key] = (c, compile_lib.report(c, topo.chip, topo.name))
    return cache[key]
  return get


# Meshes per topology of 4 chips: data, FSDP and tensor parallelism; and two slices of 4 (data across DCN).
@pytest.mark.parametrize('spec, mesh, num_slices', [
    ('v5e:2x2', (4, 1, 1), 1), ('v5e:2x2', (1, 4, 1), 1), ('v5e:2x2', (1, 1, 4), 1),
    ('v4:2x2x1', (4, 1, 1), 1), ('v4:2x2x1', (1, 4, 1), 1), ('v4:2x2x1', (2, 1, 2), 1),
    ('v5e:2x2', (2, 4, 1), 2)])
def test_tiny_bert_compiles_cleanly(compiled, spec, mesh, num_slices):
  _, r = compiled(spec, mesh=mesh, num_slices=num_slices)
  assert r['warnings'] == []
  assert r['memory_per_chip']['fits'] and r['memory_per_chip']['temp'] >= 0
  assert r['devices']['count'] == 4 * num_slices and r['mesh'] == dict(zip(('data', 'fsdp', 'tensor'), mesh))
  check_flops(r, mesh)
  # XLA's cost analysis (loop-corrected) adds the elementwise work: softmax, LayerNorm, GELU, AdamW.
  assert 1.0 <= r['hlo_flops_per_chip'] / r['model_flops_per_chip'] <= 1.35
  rl = r['roofline']
  assert rl['step_s'] == max(rl['compute_s'], rl['memory_s'], rl['ici_s']) and 0 < rl['mfu'] <= 1
  coll = r['collectives']
  if mesh[1] > 1:  # FSDP gathers the weights of every layer
    assert coll['all-gather']['count'] > 0
  if num_slices > 1:  # the gradient reduction over the data axis crosses the slices
    assert sum(s['dcn_traffic'] for s in coll.values()) > 0
  else:
    assert all(s['dcn_count'] == 0 for s in coll.values())
  if mesh == (4, 1, 1):  # data parallelism: gradients summed over all four chips, nothing gathered
    assert coll['all-reduce']['count'] > 0 and coll['all-gather']['count'] == 0


def test_fsdp_splits_parameters_and_optimizer_state_four_ways(compiled):
  c, r = compiled('v5e:2x2', mesh=(1, 4, 1))
  # Parameters and AdamW moments from the parameter tree, replicated: what one chip would hold without FSDP.
  replicated = sum(math.prod(x.shape) * x.dtype.itemsize for x in
                   __import__('jax').tree_util.tree_leaves((c.state.params, c.state.opt_state)))
  assert r['memory_per_chip']['argument'] == pytest.approx(replicated / 4, rel=0.05)


def test_cost_analysis_is_per_chip_and_loops_are_counted(compiled):
  # One chip and four, same global batch: the per-chip figures fall four-fold, so they are per device.
  _, one = compiled('v5e:1x1')
  _, four = compiled('v5e:2x2', mesh=(4, 1, 1))
  assert one['hlo_matmul_flops_per_chip'] == pytest.approx(4 * four['hlo_matmul_flops_per_chip'], rel=0.01)
  assert one['cost_analysis']['flops'] == pytest.approx(4 * four['cost_analysis']['flops'], rel=0.05)
  # Two scanned layers: XLA's own analysis counts the loop body once, well below the model's FLOPs; the
  # report counts it twice (check_flops: the matmuls within 2% of the model's).
  assert four['cost_analysis']['flops'] < 0.8 * four['model_flops_per_chip']
  check_flops(four, (4, 1, 1))


@pytest.mark.parametrize('name', ['albert', 'electra', 'convbert'])
@pytest.mark.parametrize('mesh', [(1, 4, 1), (1, 1, 4)], ids=['fsdp', 'tensor'])
def test_no_involuntary_rematerialisation(compiled, name, mesh):
  # (BERT: test_tiny_bert_compiles_cleanly.) Under tensor parallelism these tiny one-layer models spend a
  # large share on heads the tensor axis does not split (ELECTRA's discriminator dense layer over every
  # token), which each chip repeats: their FLOPs are checked under FSDP only.
  _, r = compiled('v4:2x2x1', name, mesh)
  assert r['warnings'] == []
  if mesh[2] == 1:
    check_flops(r, mesh)


def test_finetuning_step_compiles_on_the_mesh(devices, tmp_path):
  """Fine-tuning's step (the classifier objective, layer-wise decay) compiles like pretraining's, sharded."""
  from test_glue import tiny_hf_bert  # pylint: disable=g-import-not-at-top
  c = load_config_module('glue').get_config('sst2')
  c.init_from = tiny_hf_bert(tmp_path / 'hf', vocab_size=128)
  c.data.seq_len, c.batch_size, c.num_train_steps = 16, 16, 10
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 1
  topo, devs = devices('v5e:2x2')
  r = compile_lib.report(compile_lib.compile_train_step(c, devs), topo.chip, topo.name)
  assert r['memory_per_chip']['fits'] and r['warnings'] == [] and r['model']['objective'] == 'classification (sst2)'
  assert r['batch']['size'] == 16 and r['collectives']['all-gather']['count'] > 0


def test_collectives_are_read_from_hlo_text():
  text = '\n'.join([
      'HloModule m', '',
      '%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {',
      '  %p = (s32[], f32[8,128]) parameter(0)',
      '  %g = f32[32,128]{1,0} all-gather(f32[8,128]{1,0} %x), channel_id=3, replica_groups=[2,4]<=[8], '
      'dimensions={0}',
      '  %g2 = f32[32,128]{1,0} all-gather(f32[8,128]{1,0} %y), channel_id=3, replica_groups=[2,4]<=[8], '
      'dimensions={0}',
      '}', '',
      '%cond (p: (s32[], f32[8,128])) -> pred[] {',
      '  %c = s32[] constant(12)',
      '  ROOT %lt = pred[] compare(s32[] %i, s32[] %c), direction=LT',
      '}', '',
      'ENTRY %main (a: f32[8,128]) -> f32[8,128] {',
      '  %w = (s32[], f32[8,128]) while((s32[], f32[8,128]) %t), condition=%cond, body=%body',
      '  %r = bf16[1024]{0} all-reduce(bf16[1024]{0} %a), channel_id=7, replica_groups={{0,1},{2,3},{4,5},{6,7}}, '
      'to_apply=%add',
      # A multi-slice program's reduction across slices: sends to the megascale runtime (and matching recvs).
      '  %send = (f32[256]{0}, u32[], token[]) send(%r, %t), channel_id=9, is_host_transfer=true, '
      'frontend_attributes={_xla_host_transfer_rendezvous="all-reduce.1_0",_xla_megascale_transfer_type="ALL_REDUCE"}',
      '  %send.2 = (f32[256]{0}, u32[], token[]) send(%r, %t), channel_id=10, is_host_transfer=true, '
      'frontend_attributes={_xla_host_transfer_rendezvous="all-reduce.1_0",_xla_megascale_transfer_type="ALL_REDUCE"}',
      '  %recv = (f32[256]{0}, u32[], token[]) recv(%t), channel_id=11, is_host_transfer=true, '
      'frontend_attributes={_xla_host_transfer_rendezvous="all-reduce.1_0",_xla_megascale_transfer_type="ALL_REDUCE"}',
      '}'])
  found = hlo.collectives(text, num_slices=4)
  dcn, gather, reduce = sorted(found, key=lambda c: (not c.crosses_slices, c.kind))
  assert (gather.kind, gather.bytes, gather.group, gather.runs) == ('all-gather', 32 * 128 * 4, 4, 12)
  assert gather.traffic == 32 * 128 * 4 * 3 / 4 and not gather.crosses_slices
  assert (reduce.kind, reduce.bytes, reduce.group, reduce.runs) == ('all-reduce', 2048, 2, 1)
  assert reduce.traffic == 2048 and not reduce.crosses_slices
  assert (dcn.kind, dcn.bytes, dcn.group, dcn.crosses_slices) == ('all-reduce', 1024, 4, True)
  s = hlo.summarise(found)
  assert s['all-gather']['count'] == 12 and s['all-gather']['ici_traffic'] == 12 * gather.traffic
  assert s['all-reduce']['count'] == 2 and s['all-reduce']['dcn_traffic'] == 2 * 1024 * 3 / 4
  assert hlo.replica_groups('replica_groups=[4,2]<=[2,4]T(1,0)', 8).tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_windowed_matmul_loops_count_their_iterations():
  """The TPU compiler's windowed (collective) matmul under FSDP, in the form it writes: a u32 counter in
  tuple element 1, compared with 4 and advanced by 2 per iteration (both ways round the ring): 2 runs of the
  body per run of the enclosing scan body (12), so 24. Counting it once made ALBERT-xxlarge's FLOPs half the
  model's and its estimated MFU 149%."""
  text = '\n'.join([
      'HloModule m', '',
      '%wbody (p: (f32[8,128], u32[])) -> (f32[8,128], u32[]) {',
      '  %p = (f32[8,128], u32[]) parameter(0)',
      '  %two = u32[]{:T(128)} constant(2)',
      '  %i = u32[]{:T(128)} get-tuple-element(%p), index=1',
      '  %next = u32[]{:T(128)} add(%i, %two)',
      '}', '',
      '%wcond (p: (f32[8,128], u32[])) -> pred[] {',
      '  %four = u32[]{:T(128)} constant(4)',
      '  %p = (f32[8,128], u32[]) parameter(0)',
      '  %i = u32[]{:T(128)} get-tuple-element(%p), index=1',
      '  ROOT %lt = pred[]{:T(512)} compare(%i, %four), direction=LT',
      '}', '',
      '%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {',
      '  %w = (f32[8,128], u32[]) while((f32[8,128], u32[]) %t), condition=%wcond, body=%wbody',
      '}', '',
      '%cond (p: (s32[], f32[8,128])) -> pred[] {',
      '  %c = s32[] constant(12)',
      '  ROOT %lt = pred[] compare(s32[] %i, s32[] %c), direction=LT',
      '}', '',
      'ENTRY %main (a: f32[8,128]) -> f32[8,128] {',
      '  %w = (s32[], f32[8,128]) while((s32[], f32[8,128]) %t), condition=%cond, body=%body',
      '}'])
  runs, _ = hlo.runs_per_step(text)
  assert runs['body'] == 12 and runs['wbody'] == 24


def test_matmul_flops_of_a_batched_product_written_as_a_dilated_convolution():
  # The TPU compiler's form of bqhd,bkhd->bhqk with B=16 as a spatial dimension dilated by 16: one tap each.
  text = '\n'.join([
      'ENTRY %main (a: bf16[16,128,64], b: bf16[16,128,64]) -> bf16[16,128,128] {',
      '  %a = bf16[16,128,64]{2,1,0} parameter(0)',
      '  %b = bf16[16,64,128]{2,1,0} parameter(1)',
      '  %c = bf16[16,128,128]{2,1,0} convolution(%a, %b), window={size=16 stride=15 lhs_dilate=16}, '
      'dim_labels=0bf_0io->0bf',
      '  %e = f32[128,64]{1,0} parameter(2)',
      '  %d = f32[128,256]{1,0} dot(%e, %f), lhs_contracting_dims={1}, rhs_contracting_dims={0}',
      '}'])
  assert hlo.costs(text)['matmul_flops'] == 2 * 16 * 128 * 128 * 64 + 2 * 128 * 256 * 64


def test_stderr_of_the_compiler_is_captured(capfd):
  with hlo.captured_stderr() as lines:
    os.write(2, b'W0000 spmd_partitioner.cc] [SPMD] Involuntary full rematerialization. x\n')
  assert lines == ['W0000 spmd_partitioner.cc] [SPMD] Involuntary full rematerialization. x']
  assert capfd.readouterr().err == ''


def test_the_reports_warnings_are_the_partitioners_and_the_rematerialisation_passs():
  # Lines as the TPU compiler wrote them (BERT-mini under FSDP+TP before its fix; ALBERT-xxlarge L512 at batch
  # 928 on v5p-64, where the recomputation made its matmuls 1.67x the model's).
  log = ['I1205 00:15:39.1  7299 compiler.cc:12] compiling',
         'W1205 00:15:40.281373    7299 hlo_rematerialization.cc:3231] Can\'t reduce memory use below 90.87GiB '
         '(97569645670 bytes) by rematerialization; only reduced to 92.32GiB (99129299712 bytes), down from 93.82GiB',
         ' W0000 spmd_partitioner.cc:630] [SPMD] Involuntary full rematerialization. The compiler was not able ']
  assert hlo.warnings(log) == [line.strip() for line in log[1:]]


def _cli(*args, timeout=300):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  return subprocess.run([sys.executable, '-m', 'posjax.aot', '--config=bert:tiny', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize('args, message', [
    (['--topology=v5e-6'], 'error: --topology \'v5e-6\': no such slice; v5e slices are'),
    (['--topology=v5e-4', '--config.mesh.data=8'],
     'error: mesh: {\'data\': 8, \'fsdp\': 1, \'tensor\': 1} needs 8 devices, but 4 are present'),
    (['--topology=v5e-1', '--config.batch_size=65536', '--config.data.seq_len=512', '--config.model.scan_layers=True'],
     'does not fit (mesh data=1 fsdp=1 tensor=1): the compiler says: Ran out of memory'),
], ids=['topology', 'mesh', 'does-not-fit'])
def test_cli_errors_are_one_line(args, message):
  out = _cli(*args)
  assert out.returncode == 2, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and message.split('error: ')[-1] in lines[0], lines
  if 'fit' in message:  # the line carries the memory figures
    assert 'GiB' in lines[0] and 'HBM' in lines[0]


def test_cli_report_and_json(tmp_path):
  out = _cli('--topology=v5e-4', '--config.mesh.fsdp=2', '--config.model.scan_layers=True',
             '--config.model.dtype=bfloat16', f'--report_json={tmp_path}/r.json', f'--dump_hlo={tmp_path}/hlo')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'total' in out.stdout and 'estimated MFU' in out.stdout and 'all-gather' in out.stdout
  r = json.loads((tmp_path / 'r.json').read_text())
  assert r['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 1} and r['memory_per_chip']['fits']
  assert sorted(os.listdir(tmp_path / 'hlo')) == ['report.json', 'train_step.optimized.hlo.txt',
                                                  'train_step.stablehlo.mlir']


@pytest.mark.parametrize('start, per_row, convex, largest, compiles', [
    (256, 3.0, 0, 1300, 4), (16, 0.37, 0, 10540, 4), (4096, 50.0, 0, 78, 7), (256, 3.0, 1e-5, 1294, 4),
    (16, 0.37, 1e-5, 8560, 14)])
def test_find_max_batch_closes_the_bracket_in_few_compiles(monkeypatch, devices, start, per_row, convex, largest,
                                                            compiles):
  # Memory per chip (MB) = 100 + per_row x batch (+ convex x batch^2); the chip has 4000 MB. Divisor 1. Linear
  # memory takes four compiles (the start, the line through it and the origin, which undershoots, the two-point
  # extrapolation and the batch after it), a start far too large quarters down first, and a convex curve far
  # from the start alternates extrapolations that overshoot with halvings.
  topo, devs = devices('v5e:1x1')
  chip = dataclasses.replace(topo.chip, hbm_bytes=4000)
  calls = []

  def probe(config, devs_, chip_, batch):
    calls.append(batch)
    total = 100 + per_row * batch + convex * batch ** 2
    return (total, f'compiled at {batch}') if total <= 4000 else (None, None)

  monkeypatch.setattr(compile_lib, '_probe', probe)
  best, tried = compile_lib.find_max_batch(small_config(batch_size=start), devs, chip)
  assert best == f'compiled at {largest}' and tried == calls and largest + 1 in calls
  assert len(calls) <= compiles, calls


def test_find_max_batch_resumes_from_figures_and_compiles_a_fit_known_only_by_them(monkeypatch, devices):
  # bench/aot_tables.py resumes searches from the bytes its JSON kept: two known fits give the line at once.
  topo, devs = devices('v5e:1x1')
  chip = dataclasses.replace(topo.chip, hbm_bytes=4000)
  calls = []

  def probe(config, devs_, chip_, batch):
    calls.append(batch)
    total = 100 + 3 * batch
    return (total, f'compiled at {batch}') if total <= 4000 else (None, None)

  monkeypatch.setattr(compile_lib, '_probe', probe)
  known = {256: 100 + 3 * 256, 512: 100 + 3 * 512}
  best, tried = compile_lib.find_max_batch(small_config(batch_size=256), devs, chip, known=known)
  assert calls == tried == [1300, 1301] and best == 'compiled at 1300'
  calls.clear()  # no compile left: the largest fit is the known one, compiled to be returned
  best, tried = compile_lib.find_max_batch(small_config(batch_size=256), devs, chip, max_compiles=0, known=known)
  assert tried == [] and calls == [512] and best == 'compiled at 512'
  calls.clear()  # one known fit: the line through it and the origin first (undershoots), then the two-point line
  best, tried = compile_lib.find_max_batch(small_config(batch_size=256), devs, chip, max_compiles=2,
                                           known={256: 100 + 3 * 256})
  assert calls == tried == [1179, 1300] and best == 'compiled at 1300'
  # A known fit that no longer fits when compiled (a figure from another version) is said so, in one line.
  with pytest.raises(compile_lib.DoesNotFit, match='batch 2000, known to fit .* does not fit when compiled again'):
    compile_lib.find_max_batch(small_config(batch_size=256), devs, chip, max_compiles=0, known={2000: 3000})


@pytest.mark.parametrize('max_compiles, below, message', [
    (16, None, 'no batch fits: not even 1 '),
    (2, 256, 'no batch tried fits, down to 256: the search stopped after 2 compiles')])  # 1024, then a quarter
def test_find_max_batch_without_a_fit_says_whether_it_reached_the_smallest_batch(monkeypatch, devices, max_compiles,
                                                                                 below, message):
  topo, devs = devices('v5e:1x1')
  monkeypatch.setattr(compile_lib, '_probe', lambda *args: (None, None))  # nothing fits
  with pytest.raises(compile_lib.DoesNotFit, match=message) as e:
    compile_lib.find_max_batch(small_config(batch_size=1024), devs, topo.chip, max_compiles=max_compiles)
  assert e.value.below == below


def test_find_max_batch_counts_a_known_compile_over_the_chips_memory_as_a_miss(monkeypatch, devices):
  """A compile that succeeded but needs more than the chip's HBM (the compiler does not always stop there)
  is a miss at its batch: with no compile left the search says none fits down to that batch, not that
  none fits at all (bench/aot_tables.py recorded such a row as "largest 0")."""
  topo, devs = devices('v5e:1x1')
  monkeypatch.setattr(compile_lib, 'report_memory', lambda compiled: {'total': 2 * topo.chip.hbm_bytes})
  over = compile_lib.Compiled(*([None] * len(dataclasses.fields(compile_lib.Compiled))))
  with pytest.raises(compile_lib.DoesNotFit, match='down to 1024') as e:
    compile_lib.find_max_batch(small_config(batch_size=1024), devs, topo.chip, max_compiles=0, known={1024: over})
  assert e.value.below == 1024


def test_bytes_of_in_place_updates_count_the_slice():
  # A scan writes each layer's activations into a stacked buffer in place: a slice, not the whole buffer.
  text = '\n'.join([
      '%fused (p0: f32[12,1024], p1: f32[1,1024], p2: s32[]) -> f32[12,1024] {',
      '  %p0 = f32[12,1024]{1,0} parameter(0)',
      '  %p1 = f32[1,1024]{1,0} parameter(1)',
      '  %p2 = s32[] parameter(2)',
      '  %z = s32[] constant(0)',
      '  ROOT %u = f32[12,1024]{1,0} dynamic-update-slice(%p0, %p1, %p2, %z)',
      '}', '',
      'ENTRY %main (a: f32[12,1024], b: f32[1,1024], i: s32[]) -> f32[12,1024] {',
      '  %a = f32[12,1024]{1,0} parameter(0)',
      '  %b = f32[1,1024]{1,0} parameter(1)',
      '  %i = s32[] parameter(2)',
      '  %f = f32[12,1024]{1,0} fusion(%a, %b, %i), kind=kLoop, calls=%fused',
      '  %s = f32[1,1024]{1,0} dynamic-slice(%a, %i, %i), dynamic_slice_sizes={1,1024}',
      '}'])
  # fusion: reads the update (4 KiB) and the index, writes the 4 KiB slice; dynamic-slice: 4 KiB in and out.
  assert hlo.costs(text)['bytes'] == (4096 + 4 + 4096) + 2 * 4096
