"""The fused Pallas kernels (posjax.attention.flash: Mosaic for TPUs, and its Triton form for GPUs in
flash_gpu), run in interpret mode on the CPU, against posjax's XLA path: jax.nn.dot_product_attention with
the offset tables spread into a dense bias. Outputs and gradients
(q, k, v, the table and every position parameter) agree within 1e-5 in float32; the whole-model and train-step
tests switch only `model.attention_impl`. Interpret mode is slow, so the default cases are tiny and the
sweep over every single term, block shape and bf16 runs with `-m slow`."""

import dataclasses
import logging as std_logging
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

import posjax
from posjax.attention import flash, flash_gpu, offsets, registry
from posjax.errors import ConfigError
from posjax.data import pipeline, pretrain
from posjax.training import objectives, pretraining, steps

from helpers import micro_config, random_params

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5


def distance_term(q, k, dist):
  """A `flash.Distances` term written out: [b, h, i, j] = scale (q_i . r + k_j . r, by its side) with r the
  table's row for offset j - i gathered over the LxL grid (tiny shapes only). It reads the rows by the
  convention `Distances` states, so it checks the kernel's tiling, gathers and gradients; that each module's
  `Distances` means its own term is checked by the layer tests against the modules' XLA paths."""
  l = q.shape[1]
  d = np.arange(l)[None, :] - np.arange(l)[:, None]  # j - i
  c = (dist.table_RxDh.shape[0] - 1) // 2
  r_LxLxDh = dist.table_RxDh[np.clip(-d if dist.by_query_offset else d, -c, c) + c].astype(q.dtype)
  term = 0.0
  if dist.side != 'key':
    term = term + jnp.einsum('bihd,ijd->bhij', q, r_LxLxDh)
  if dist.side != 'query':
    term = term + jnp.einsum('bjhd,ijd->bhij', k, r_LxLxDh)
  return dist.scale * term


def xla_attention(q, k, v, table, mask, scale, distances=()):
  """XLA for the same inputs: posjax's spread of the table over LxL and the distance terms written out
  (`distance_term`), added as a dense bias; masked keys by `mask`."""
  bias = None if table is None else offsets.spread(table, q.shape[1]).astype(q.dtype)
  for dist in distances:
    term = distance_term(q, k, dist).astype(q.dtype)
    bias = term if bias is None else bias + term
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask[:, None, None, :], scale=scale)


def inputs(b, l, h, dh, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, l, h, dh)), dtype) for _ in range(3))
  table = jnp.asarray(rng.normal(size=(h, 2 * l - 1)), jnp.float32)
  mask = np.ones((b, l), bool)
  mask[1, l // 2 + 3:] = False  # a padded row
  mask[0, 5] = False  # a masked key inside a row
  if b > 2:
    mask[2] = False  # a row of padding only: every key masked, attends uniformly as in the XLA path
  return q, k, v, table, jnp.asarray(mask)


def both_ways(q, k, v, table, mask, w, interpret=True, distances=(), float64_oracle=False, **blocks):
  """(outputs, gradients w.r.t. q, k, v, table (and each distance table)) of the kernel and of the XLA path,
  for loss sum(out * w). `distances`: `flash.Distances` fields (table_RxDh, by_query_offset, side, scale).
  `float64_oracle`: the XLA path on float64 copies of the inputs."""
  scale = q.shape[-1] ** -0.5
  args = (q, k, v) if table is None else (q, k, v, table)
  args += tuple(d[0] for d in distances)
  argnums = tuple(range(len(args)))

  def dist(a):
    return tuple(flash.Distances(r, *d[1:]) for r, d in zip(a[len(a) - len(distances):], distances))

  def kernel(*a):
    return flash.attention(*a[:3], a[3] if table is not None else None, mask, scale=scale,
                           interpret=interpret, distances=dist(a), **blocks)

  def xla(*a):
    return xla_attention(*a[:3], a[3] if table is not None else None, mask, scale, dist(a))

  out = []
  for f in (kernel, xla):
    x64 = float64_oracle and f is xla
    def loss(*a, f=f):
      o = f(*a)
      return jnp.sum(o.astype(jnp.float64 if x64 else jnp.float32) * w), o
    with jax.enable_x64(x64):
      a = [jnp.asarray(np.asarray(x), jnp.float64) for x in args] if x64 else args
      (_, o), g = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(*a)
    out.append((o, g))
  return out


# L=300 padded to 512: 2 query blocks of 256 and 4 key blocks of 128, the last of them padding only; a
# variant without offset terms.
@pytest.mark.parametrize('shape, blocks, with_table', [
    ((3, 300, 2, 8), dict(block_q=256, block_k=128), True),
    ((2, 77, 2, 8), {}, False),
])
def test_kernel_matches_xla_outputs_and_gradients(shape, blocks, with_table):
  q, k, v, table, mask = inputs(*shape)
  w = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  (o1, g1), (o2, g2) = both_ways(q, k, v, table if with_table else None, mask, w, **blocks)
  np.testing.assert_allclose(o1, o2, atol=TOL, rtol=0)
  for name, a, b in zip(('q', 'k', 'v', 'table'), g1, g2):
    np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=name)


# The GPU kernel: L=100 padded to 128 (two blocks of 64, the second partly padding), with a padded row and
# a padding-only row; then no table.
@pytest.mark.parametrize('shape, with_table', [((3, 100, 2, 16), True), ((2, 77, 2, 16), False)])
def test_gpu_kernel_matches_xla_outputs_and_gradients(shape, with_table):
  q, k, v, table, mask = inputs(*shape)
  w = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  (o1, g1), (o2, g2) = both_ways(q, k, v, table if with_table else None, mask, w, kernel='triton')
  np.testing.assert_allclose(o1, o2, atol=TOL, rtol=0)
  for name, a, b in zip(('q', 'k', 'v', 'table'), g1, g2):
    np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=name)


def test_gpu_kernel_lowers_to_triton():
  """Lowered for CUDA on this CPU host (no GPU): Pallas turns the forward kernel and the two backward kernels
  into Triton IR, one custom call each, for BERT-base's heads in bfloat16. Triton's own compilation to PTX
  happens in XLA on a GPU and is not checked here."""
  b, l, h, dh = 2, 200, 12, 64
  s = jax.ShapeDtypeStruct
  x, table, mask = s((b, l, h, dh), jnp.bfloat16), s((h, 2 * l - 1), jnp.float32), s((b, l), jnp.bool_)

  def loss(q, k, v, t, m):
    return jnp.sum(flash.attention(q, k, v, t, m, scale=0.125, kernel='triton').astype(jnp.float32))
  for fn, calls in ((loss, 1), (jax.grad(loss, (0, 1, 2, 3)), 3)):
    text = jax.jit(fn).trace(x, x, x, table, mask).lower(lowering_platforms=('cuda',)).as_text()
    assert text.count('custom_call @__gpu$xla.gpu.triton') == calls


# relative_key_query's vectors serve both terms (one input); composite attention's convq and convk have one
# each, with relative_key's added to the query side.
@pytest.mark.parametrize('sides', [('both',), ('query', 'query', 'key')])
def test_tpu_kernel_compiles_for_a_tpu_chip(sides):
  """The Mosaic kernels (forward, dq, dk/dv/tables) compiled by libtpu for one v5e chip from this CPU host,
  with an offset table and distance terms, in bfloat16 with a length that is not a multiple of the block:
  three Mosaic custom calls, no LxL buffer
  (a 200 x 200 float32 score matrix per head would be 0.3 MiB; the compiler asks for none of it)."""
  from posjax.aot import topology  # pylint: disable=g-import-not-at-top
  devices = topology.devices(topology.parse('v5e:1x1'))
  rep = jax.sharding.NamedSharding(jax.sharding.Mesh(devices[:1], ('x',)), jax.sharding.PartitionSpec())
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
  b, l, h, dh = 2, 200, 2, 64
  x, table, mask = s((b, l, h, dh), jnp.bfloat16), s((h, 2 * l - 1), jnp.float32), s((b, l), jnp.bool_)
  rs = [s((2 * 128 - 1 if n == 0 else 17, dh), jnp.float32) for n in range(len(sides))]

  def loss(q, k, v, t, m, *rs):
    dist = [flash.Distances(r, side != 'query', side, 0.125) for r, side in zip(rs, sides)]
    return jnp.sum(flash.attention(q, k, v, t, m, scale=0.125, distances=dist).astype(jnp.float32))
  argnums = (0, 1, 2, 3, *range(5, 5 + len(rs)))
  compiled = jax.jit(jax.grad(loss, argnums)).lower(x, x, x, table, mask, *rs).compile()
  assert compiled.as_text().count('tpu_custom_call') == 3
  assert compiled.memory_analysis().temp_size_in_bytes < b * h * l * l * 4


def test_gpu_kernel_refuses_head_dimensions_triton_cannot_tile():
  q, k, v, table, mask = inputs(2, 20, 2, 8)
  with pytest.raises(ConfigError, match='power of two >= 16; got 8'):
    flash.attention(q, k, v, table, mask, scale=1.0, kernel='triton', interpret=True)


# Distance terms with a TISA-like table: blocks of 256 queries x 128 keys (two query sub-tiles per tile), L = 300
# padded to 512, so offsets reach +-3 rows of 128 beyond the one row each side that the clipped terms fill
# (the kernel reads those from the edge rows). relative_key_query: one table of 2M-1 = 79 rows on both sides
# (clipped at 39, indexed by i - j);
# composite attention's convq and convk (5 taps, clipped at 2; convk indexed by i - j) with relative_key on
# the query side too; convk alone (no query rows: the dq kernel gets nothing from them); the query side alone
# runs with -m slow.
@pytest.mark.parametrize('terms', [
    [(79, True, 'both')], [(79, True, 'query'), (5, False, 'query'), (5, True, 'key')], [(5, True, 'key')],
    pytest.param([(79, True, 'query')], marks=pytest.mark.slow)])
def test_kernel_distance_terms_match_xla(terms):
  shape = (3, 300, 2, 8)
  q, k, v, table, mask = inputs(*shape)
  rng = np.random.default_rng(5)
  dist = [(jnp.asarray(rng.normal(size=(rows, shape[-1])), jnp.float32), by_query, side, shape[-1] ** -0.5)
          for rows, by_query, side in terms]
  w = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  # The oracle in float64: a distance table's edge rows sum the gradients of every clipped offset (~10^5
  # logits here), which XLA's float32 path itself gets only within ~4e-5 (the kernel within ~4e-6).
  (o1, g1), (o2, g2) = both_ways(q, k, v, table, mask, w, distances=dist, float64_oracle=True, block_q=256,
                                 block_k=128)
  np.testing.assert_allclose(o1, o2, atol=TOL, rtol=0)
  names = ('q', 'k', 'v', 'table', *(f'distance table {n}' for n in range(len(terms))))
  for name, a, b in zip(names, g1, g2, strict=True):
    np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=name)


def test_blocks_pad_to_a_common_multiple():
  assert flash.blocks(300, 128, 128) == flash.Blocks(128, 128, 384)
  assert flash.blocks(200, 256, 128) == flash.Blocks(256, 128, 256)
  assert flash.blocks(8192) == flash.Blocks(512, 512, 8192)
  assert flash.blocks(640) == flash.Blocks(128, 128, 640)  # 640 = 5 x 128: no padding to 1024
  with pytest.raises(ValueError, match='multiples of 128'):
    flash.blocks(300, 100, 128)


def tiny(variant, **kw):
  return posjax.ModelConfig(**{**dict(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2,
                                      intermediate_size=48, max_position_embeddings=64, hidden_dropout=0.0,
                                      attention_dropout=0.0, attention_impl='auto'), 'attention': variant, **kw})


def layer_outputs_and_grads(cfg, params, x, mask):
  """One attention layer (projections, terms, output projection): y and the gradients of sum(y * w) with
  respect to every parameter and the input."""
  layer = posjax.attention.MultiHeadAttention(cfg)
  w = np.random.default_rng(1).standard_normal(x.shape) / np.sqrt(x.size)

  def loss(p, x):
    y = layer.apply({'params': p}, x, mask)
    return jnp.sum(y.astype(jnp.float32) * w), y
  return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)


def check_layer(variant, options=(), l=20):
  """((loss, y), gradients) of the XLA path and of the kernel, for a batch with a padded row and a
  padding-only row."""
  used = {o.name for o in registry.used_options(registry.parse(variant))}
  cfg = tiny(variant, attention_options=tuple((k, v) for k, v in options if k in used))
  rng = np.random.default_rng(2)
  x = rng.standard_normal((3, l, cfg.hidden_size)).astype(np.float32)
  mask = np.ones((3, l), bool)
  mask[1, l // 2 + 1:] = False
  mask[2] = False
  params = random_params(posjax.attention.MultiHeadAttention(cfg).init, x, mask, scale=0.2, ones_at='scale')
  return [layer_outputs_and_grads(dataclasses.replace(cfg, attention_impl=impl), params, x, mask)
          for impl in ('xla', 'pallas')]


def assert_same(got, want, tol=TOL):
  (l_p, y_p), g_p = got
  (l_x, y_x), g_x = want
  np.testing.assert_allclose(l_p, l_x, atol=tol, rtol=0)
  np.testing.assert_allclose(y_p, y_x, atol=tol, rtol=0)
  flat_x = dict(jax.tree_util.tree_leaves_with_path(g_x))
  for path, g in jax.tree_util.tree_leaves_with_path(g_p):
    np.testing.assert_allclose(g, flat_x[path], atol=tol, rtol=0, err_msg=jax.tree_util.keystr(path))
  return g_p


OPTIONS = (('composite_kernel_size', 5), ('t5_max_distance', 12), ('t5_num_buckets', 8), ('tisa_kernels', 2),
           ('max_relative_position', 12))


# Two offset terms summed (the train-step test has the other two), a distance term on both sides, and
# composite attention (an offset term and one distance term on each side); every single term and more mixes
# run with `-m slow`.
@pytest.mark.parametrize('variant', [
    't5+convfixed', 'alibi+relative_key_query', 'none+convfixed+convq+convk',
    *[pytest.param(v, marks=pytest.mark.slow) for v in (
        'tisa', 't5', 'alibi', 'convfixed', 'tisa+alibi', 'tisa+t5+alibi+convfixed', 'rope+alibi', 'relative_key',
        'convq', 'convk', 'relative_key+convq', 'tisa+relative_key_query+convk', 'absolute+convfixed+convvalues',
        'none+convbert+tisa', 'absolute')]])
def test_layer_with_kernel_matches_xla(variant):
  xla, kernel = check_layer(variant, OPTIONS)
  g_params, _ = assert_same(kernel, xla)
  for term in variant.split('+'):  # each term's own parameters get a gradient
    if (registry.get(term).offsets or registry.get(term).distances) and term in g_params:
      assert all(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(g_params[term])), term


@pytest.mark.parametrize('kernel', ['mosaic', 'triton'])
def test_train_step_with_kernel_matches_xla(kernel, monkeypatch):
  """A whole BERT MLM step (dropout off): the loss and every gradient, the kernel against the XLA path; the
  CPU runs the kernel a GPU would as well as the TPU's (which also takes relative_key and convk terms)."""
  monkeypatch.setattr(flash, 'kernel_for', lambda platform: kernel)
  c = micro_config('tiny,tisa+alibi' + ('+relative_key+convk' if kernel == 'mosaic' else ''))
  c.data.seq_len, c.batch_size = 24, 4
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 100, size=(4, 24)).astype(np.int32)
  ids[1, 15:] = 0
  ids[:, 0] = 2
  batch = pipeline.MLMBatches({'ids': ids}, 4, pretrain.Specials(0, 2, 3, 4, 1), 100, seed=0).batch(0)
  results, params = {}, None
  for impl in ('xla', 'pallas'):
    c.model.attention_impl = impl
    objective = objectives.make(c, pretraining.model_config(c, 100), 24, batch['positions'].shape[1])
    params = params or random_params(lambda r: {'params': objective.init(r)}, scale=0.2, ones_at='scale')
    fn = jax.jit(lambda p, b: steps.gradients(objective, p, b, jax.random.PRNGKey(0)))
    results[impl] = fn(params, batch)
  (l_x, _), g_x = results['xla']
  (l_p, _), g_p = results['pallas']
  np.testing.assert_allclose(l_p, l_x, atol=TOL, rtol=0)
  flat_x = dict(jax.tree_util.tree_leaves_with_path(g_x))
  assert len(flat_x) > 20
  for path, g in jax.tree_util.tree_leaves_with_path(g_p):
    np.testing.assert_allclose(g, flat_x[path], atol=TOL, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_no_length_by_length_tensor_with_the_kernel():
  """The forward and backward pass of a TISA+ALiBi+relative_key_query+convq+convk model hold nothing of size
  H x L x L outside the kernel
  (whose tiles are 128 x 128 < L x L here); with the XLA path they do."""
  l = 300
  ids = jnp.ones((1, l), jnp.int32)

  def largest(impl):
    cfg = dataclasses.replace(tiny('tisa+alibi+relative_key_query+convq+convk'), max_position_embeddings=512,
                              attention_impl=impl)
    model = posjax.Bert(cfg)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), ids)['params']))
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, ids)['hidden_BxLxD'])))(params)
    sizes = []

    def walk(jx):
      for eqn in jx.eqns:
        if eqn.primitive.name == 'pallas_call':
          continue
        sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, 'shape'))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          walk(sub)
    walk(jaxpr.jaxpr)
    return max(sizes)
  assert largest('xla') >= 2 * l * l
  assert largest('pallas') < l * l


@pytest.fixture
def content_term(monkeypatch):
  """'qk2', a score term of the queries and keys themselves ((q.k)^2 / Dh, no offsets, no distance vectors),
  registered for one test: every registered score term has a fused form."""
  class Squared(nn.Module):
    config: posjax.ModelConfig

    def __call__(self, q, k, mask, deterministic=True):
      return jnp.einsum('bqhd,bkhd->bhqk', q, k) ** 2 / q.shape[-1]
  monkeypatch.setitem(registry._REGISTRY, 'qk2', registry.Component('qk2', 'score', Squared))  # pylint: disable=protected-access
  return 'qk2'


def test_auto_picks_the_kernel_on_tpu_and_gpu_only_when_the_call_allows(monkeypatch, caplog, content_term):
  monkeypatch.setattr(flash, 'target_platform', lambda: 'tpu')
  monkeypatch.setattr(flash, '_LOGGED', set())
  logging.get_absl_logger().setLevel(std_logging.INFO)
  for variant in ('tisa', 't5+convfixed', 'alibi+rope', 'absolute', 'none+convbert', 'relative_key',
                  'tisa+relative_key_query', 'none+convfixed+convq+convk', 'relative_key+relative_key_query'):
    assert flash.choose(tiny(variant), dropout=False, record=False), variant
  assert not flash.choose(tiny('tisa+' + content_term), dropout=False, record=False)
  assert not flash.choose(tiny('tisa', attention_options=(('use_qk', False),)), dropout=False, record=False)
  assert not flash.choose(tiny('tisa'), dropout=False, record=True)  # analysis records the probabilities
  assert flash.choose(tiny('tisa', attention_dropout=0.1), dropout=False, record=False)  # evaluation
  assert not flash.choose(tiny('tisa', attention_dropout=0.1), dropout=True, record=False)  # training
  assert not flash.choose(tiny('tisa', attention_impl='xla'), dropout=False, record=False)
  caplog.clear()
  with caplog.at_level(std_logging.INFO):
    flash.choose(tiny('t5'), dropout=False, record=False)
    flash.choose(tiny('t5'), dropout=False, record=False)
  assert sum('fused Pallas kernel (mosaic) on tpu' in r.getMessage() for r in caplog.records) == 1  # once
  monkeypatch.setattr(flash, 'target_platform', lambda: 'cpu')
  assert not flash.choose(tiny('tisa'), dropout=False, record=False)  # auto on the CPU: XLA
  assert flash.choose(tiny('tisa', attention_impl='pallas'), dropout=False, record=False)
  monkeypatch.setattr(flash, 'target_platform', lambda: 'gpu')
  assert flash.choose(tiny('tisa'), dropout=False, record=False)  # head dimension 16
  assert not flash.choose(tiny('tisa+relative_key'), dropout=False, record=False)  # TPU kernel only
  assert not flash.choose(tiny('convfixed+convq'), dropout=False, record=False)
  with pytest.raises(ConfigError, match=r"the GPU kernel has no terms over distance vectors \(convk\; the TPU"):
    flash.choose(tiny('convk', attention_impl='pallas'), dropout=False, record=False)
  narrow = dict(hidden_size=16)  # 2 heads of 8: too narrow for Triton's dot
  caplog.clear()
  with caplog.at_level(std_logging.INFO):
    assert not flash.choose(tiny('tisa', **narrow), dropout=False, record=False)
  assert any('head dimension 8' in r.getMessage() for r in caplog.records)
  with pytest.raises(ConfigError, match="'pallas': the GPU kernel needs a head dimension .* = 8"):
    flash.choose(tiny('tisa', attention_impl='pallas', **narrow), dropout=False, record=False)
  monkeypatch.setattr(flash, 'target_platform', lambda: 'METAL')
  with pytest.raises(ConfigError, match="attention_impl='pallas' has kernels for TPUs and GPUs"):
    flash.choose(tiny('tisa', attention_impl='pallas'), dropout=False, record=False)


def test_target_platform_is_the_meshs():
  mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  assert flash.target_platform() == jax.default_backend() == 'cpu'
  with jax.set_mesh(mesh):
    assert flash.target_platform() == 'cpu'


@pytest.mark.parametrize('fields, message', [
    (dict(attention_impl='fast'), "model.attention_impl 'fast' is not one of auto, xla, pallas"),
    (dict(attention='alibi', attention_dropout=0.1, attention_impl='pallas'), 'attention dropout'),
])
def test_bad_attention_impl_is_a_config_error(fields, message):
  with pytest.raises(ConfigError, match=message):
    posjax.ModelConfig(**fields)


def test_pallas_with_a_term_the_kernel_cannot_take_is_a_config_error(content_term):
  with pytest.raises(ConfigError, match=r"attention_impl='pallas' cannot compute attention 'tisa\+qk2' with the "
                                        r"content-dependent score term\(s\) qk2 .*terms over distance vectors: "
                                        r"convk, convq, relative_key, relative_key_query\)"):
    posjax.ModelConfig(attention='tisa+' + content_term, attention_impl='pallas')


def test_pallas_on_cpu_runs_the_kernel_and_auto_does_not():
  ids = jnp.ones((1, 8), jnp.int32)

  def primitives(impl):
    model = posjax.Bert(tiny('tisa', attention_impl=impl))
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), ids)['params']))
    return str(jax.make_jaxpr(lambda p: model.apply({'params': p}, ids))(params))
  assert 'pallas_call' in primitives('pallas')
  assert 'pallas_call' not in primitives('auto')


def test_sharded_kernel_matches_one_device(tmp_path):
  """Under a data x fsdp x tensor mesh of 8 CPU devices (batch over data and fsdp, heads over tensor), each
  kernel in its shard_map gives the single-device XLA path's output and gradients, the position tables'
  summed over the batch shards."""
  out = tmp_path / 'result.npz'
  run = subprocess.run([sys.executable, os.path.join(HERE, 'flash_worker.py'), str(out)],
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-4000:]
  r = np.load(out)
  for kernel in ('mosaic', 'triton'):
    names = sorted(k.split('/', 2)[2] for k in r.files if k.startswith(f'{kernel}/xla/'))
    assert {'y', 'y_one_row'} <= set(names) and any('tisa' in n for n in names) and any('t5' in n for n in names)
    assert any('relative_key_query' in n for n in names) == any('convk' in n for n in names) == (kernel == 'mosaic')
    for n in names:
      np.testing.assert_allclose(r[f'{kernel}/pallas/{n}'], r[f'{kernel}/xla/{n}'], atol=TOL, rtol=0,
                                 err_msg=f'{kernel} {n}')


# --- slower sweep ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('shape, blocks', [((2, 600, 2, 64), dict(block_q=256, block_k=512)),
                                           ((3, 1000, 3, 32), {}), ((3, 129, 2, 8), {}),
                                           ((3, 300, 2, 8), dict(block_q=128, block_k=128))])
@pytest.mark.parametrize('kernel', ['mosaic', 'triton'])
def test_kernel_larger_shapes(shape, blocks, kernel):
  if kernel == 'triton' and not flash_gpu.head_dim_supported(shape[-1]):
    shape = shape[:-1] + (16,)
  q, k, v, table, mask = inputs(*shape, seed=3)
  w = jnp.asarray(np.random.default_rng(4).normal(size=shape), jnp.float32)
  (o1, g1), (o2, g2) = both_ways(q, k, v, table, mask, w, kernel=kernel, **blocks)
  np.testing.assert_allclose(o1, o2, atol=TOL, rtol=0)
  for name, a, b in zip(('q', 'k', 'v', 'table'), g1, g2):
    np.testing.assert_allclose(a, b, atol=10 * TOL if name == 'table' else TOL, rtol=1e-5, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize('kernel', ['mosaic', 'triton'])
def test_bfloat16_within_the_stated_bound(kernel):
  """bf16 q, k, v: both paths round probabilities to bf16 before the product with v (the XLA path after
  normalising, the kernel before), so each is held to the float32 result, not to each other: outputs
  within 2e-2 and gradients within 3% of the largest float32 gradient. The TPU kernel's case has distance
  terms on both sides too (their vectors, scale included, rounded to bf16 in the kernel, the XLA path's
  products divided after)."""
  shape = (2, 300, 2, 64)
  q, k, v, table, mask = inputs(*shape, seed=5)
  rng = np.random.default_rng(7)
  dist = [] if kernel == 'triton' else [
      (jnp.asarray(0.3 * rng.normal(size=(rows, 64)), jnp.float32), by_query, side, 64 ** -0.5)
      for rows, by_query, side in ((79, True, 'both'), (17, False, 'query'), (17, True, 'key'))]
  w = jnp.asarray(np.random.default_rng(6).normal(size=shape), jnp.float32)
  (_, _), (o32, g32) = both_ways(q, k, v, table, mask, w, block_q=128, block_k=128, kernel=kernel,
                                 distances=dist)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  (o_k, g_k), (o_x, g_x) = both_ways(*bf, table, mask, w, block_q=128, block_k=128, kernel=kernel,
                                     distances=dist)
  for o in (o_k, o_x):
    assert o.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o, np.float32), o32, atol=2e-2, rtol=0)
  for gk, gx, g in zip(g_k, g_x, g32):
    bound = 0.03 * float(np.abs(g).max())
    np.testing.assert_allclose(np.asarray(gk, np.float32), g, atol=bound, rtol=0)
    np.testing.assert_allclose(np.asarray(gx, np.float32), g, atol=bound, rtol=0)


@pytest.mark.parametrize('dtype, tol', [(jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)])
def test_compiled_kernel_on_a_tpu(dtype, tol):
  """The Mosaic kernel itself, not its interpret mode, against the XLA path on the same TPU, with an offset
  table and distance terms; runs only where JAX's backend is a TPU (`JAX_PLATFORMS=tpu python -m pytest
  tests/test_flash.py -k on_a_tpu`). Both paths' float32 matmuls at full precision; the bound is relative to
  each quantity's largest magnitude."""
  if jax.default_backend() != 'tpu':
    pytest.skip('needs a TPU backend (JAX_PLATFORMS=tpu)')
  shape = (2, 1000, 4, 64)
  q, k, v, table, mask = inputs(*shape, seed=7, dtype=dtype)
  w = jnp.asarray(np.random.default_rng(8).normal(size=shape), jnp.float32)
  # Distance terms as in relative_key_query (both sides) and composite attention's convq and convk: at L=1000
  # most sub-tiles lie beyond their reach on either side (the edge-vector branch), a few within.
  rng = np.random.default_rng(9)
  dist = [(jnp.asarray(0.3 * rng.normal(size=(rows, 64)), jnp.float32), by_query, side, 0.125)
          for rows, by_query, side in ((79, True, 'both'), (17, False, 'query'), (17, True, 'key'))]
  with jax.default_matmul_precision('highest'):
    (o1, g1), (o2, g2) = both_ways(q, k, v, table, mask, w, interpret=False, distances=dist)
  names = ('out', 'q', 'k', 'v', 'table', 'relative_key_query', 'convq', 'convk')
  for name, a, b in zip(names, (o1, *g1), (o2, *g2), strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max(), rtol=0, err_msg=name)


@pytest.mark.parametrize('dtype, tol', [(jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)])
def test_compiled_kernel_on_a_gpu(dtype, tol):
  """The Triton kernel itself against the XLA path on the same GPU; runs only where JAX's backend is a GPU
  (`python -m pytest tests/test_flash.py -k on_a_gpu`). Bound as on a TPU; Triton's float32 dots may use
  TF32 as XLA's do at default precision."""
  if jax.default_backend() != 'gpu':
    pytest.skip('needs a GPU backend')
  shape = (2, 1000, 4, 64)
  q, k, v, table, mask = inputs(*shape, seed=7, dtype=dtype)
  w = jnp.asarray(np.random.default_rng(8).normal(size=shape), jnp.float32)
  (o1, g1), (o2, g2) = both_ways(q, k, v, table, mask, w, interpret=False, kernel='triton')
  for name, a, b in zip(('out', 'q', 'k', 'v', 'table'), (o1, *g1), (o2, *g2)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max(), rtol=0, err_msg=name)
