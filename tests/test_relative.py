"""The relative-position family: relative_key, relative_key_query, t5, alibi, rope (and the sinusoidal table).

Oracles: transformers 4.57 on CPU torch (BertForMaskedLM with relative position types, T5Attention's buckets
and bias, Llama's rotary embedding) and NumPy transcriptions of the papers' formulas written here, never
posjax's own helpers.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import posjax  # noqa: E402
from helpers import random_params
from posjax.attention import MultiHeadAttention, offsets, registry  # noqa: E402
from posjax.attention.absolute import sinusoid_table  # noqa: E402
from posjax.convert import hf_bert  # noqa: E402
from posjax.errors import ConfigError  # noqa: E402

from test_hf_bert import hf_model, hf_outputs, padded_batch, posjax_outputs  # noqa: E402

TOL = 1e-5
RELATIVE = ('relative_key', 'relative_key_query')


def config(variant, heads=4, hidden=32, dtype=jnp.float32, **options):
  return posjax.ModelConfig(vocab_size=100, hidden_size=hidden, num_layers=1, num_heads=heads,
                            intermediate_size=37, max_position_embeddings=64, hidden_dropout=0.0,
                            attention_dropout=0.0, attention=variant, dtype=dtype,
                            attention_options=tuple(sorted(options.items())))


def component(cfg, name):
  """The registered module alone, as the core builds it."""
  return registry.get(name).build(cfg, name=name)


# ---------------------------------------------------------------------------------------------------------
# relative_key / relative_key_query: Hugging Face BERT is the oracle.


@pytest.mark.parametrize('pet', RELATIVE)
def test_relative_import_and_export_match_transformers(tmp_path, pet):
  model = hf_model(pet, seed=4)
  model.save_pretrained(tmp_path / 'in')
  cfg, params = hf_bert.import_bert(str(tmp_path / 'in'))
  assert cfg.attention == pet and cfg.option('max_relative_position') == 40
  assert params['encoder']['layer_1']['attention'][pet]['distance_embedding'].shape == (79, 8)
  ids, mask, types = padded_batch(seed=4)
  hidden, logits = hf_outputs(model, ids, mask, types)
  our_hidden, our_logits = posjax_outputs(cfg, params, ids, mask, types)
  np.testing.assert_allclose(our_hidden, hidden, atol=TOL, rtol=0)
  np.testing.assert_allclose(our_logits, logits, atol=TOL, rtol=0)
  # posjax's max_position_embeddings means nothing to a relative variant; HF sizes its distance table from
  # it, so the export must write max_relative_position there.
  hf_bert.export_bert(dataclasses.replace(cfg, max_position_embeddings=64), params, str(tmp_path / 'out'))
  reloaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / 'out').eval()
  assert reloaded.config.position_embedding_type == pet and reloaded.config.max_position_embeddings == 40
  _, reloaded_logits = hf_outputs(reloaded, ids, mask, types)
  np.testing.assert_allclose(reloaded_logits, our_logits, atol=TOL, rtol=0)


def test_albert_scaling_is_not_exported_as_bert(tmp_path):
  cfg = config('relative_key', relative_scaled=False, max_relative_position=16)
  with pytest.raises(ConfigError, match='relative_scaled'):
    hf_bert.export_bert(cfg, {}, str(tmp_path))


def numpy_relative_term(q, k, table, m, with_key, scaled):
  """Shaw et al.: e_ij = q_i . a_{clip(i-j, -(M-1), M-1)} (+ k_j . a_... for Huang et al.), HF row layout."""
  b, l, h, dh = q.shape
  out = np.zeros((b, h, l, l))
  for i in range(l):
    for j in range(l):
      a = table[min(max(i - j, -(m - 1)), m - 1) + m - 1]
      out[:, :, i, j] = q[:, i] @ a + (k[:, j] @ a if with_key else 0.0)
  return out / math.sqrt(dh) if scaled else out


@pytest.mark.parametrize('name', RELATIVE)
@pytest.mark.parametrize('m,l,scaled,block', [(3, 7, True, 64), (1, 4, False, 64), (9, 6, True, 64),
                                              (2, 1, False, 64), (9, 7, True, 3), (4, 6, False, 1),
                                              (9, 6, True, 2), (40, 13, True, 4)])
def test_relative_term_clips_like_shaw(name, m, l, scaled, block):
  cfg = config(name, max_relative_position=m, relative_scaled=scaled, relative_block=block)
  rng = np.random.default_rng(m * 10 + l)
  q, k = (rng.normal(size=(2, l, 4, 8)).astype(np.float32) for _ in range(2))
  mask = np.ones((2, l), bool)
  module = component(cfg, name)
  params = random_params(module.init, q, k, mask, scale=1.0)
  table = np.asarray(params['distance_embedding'])
  assert table.shape == (2 * m - 1, 8)
  ours = jax.jit(module.apply)({'params': params}, q, k, mask)
  np.testing.assert_allclose(np.asarray(ours), numpy_relative_term(q, k, table, m, name != 'relative_key',
                                                                   scaled), atol=TOL, rtol=0)


def _avals(jaxpr):
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield v.aval
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _avals(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _avals(sub)


@pytest.mark.parametrize('name', RELATIVE)
def test_relative_never_builds_a_BxHxLxLxDh_tensor(name):
  b, l, h, dh = 2, 8, 4, 8
  cfg = config(name, max_relative_position=6)
  x = jnp.ones((b, l, 32))
  mask = jnp.ones((b, l), bool)
  mha = MultiHeadAttention(cfg)
  params = nn.unbox(jax.eval_shape(mha.init, jax.random.PRNGKey(0), x, mask)['params'])
  loss = lambda p: mha.apply({'params': p}, x, mask).sum()  # noqa: E731
  closed = jax.make_jaxpr(jax.value_and_grad(loss))(params)
  shapes = [tuple(a.shape) for a in _avals(closed.jaxpr) if hasattr(a, 'shape')]
  assert any(s == (1, b, h, l, 2 * l - 1) for s in shapes)  # one block: q.r over the 2L-1 distances
  # (dot_product_attention's own 5-D reshapes for grouped heads are BxLxHx1xL, far smaller.)
  assert max(math.prod(s) for s in shapes) < b * h * l * l * dh


# ---------------------------------------------------------------------------------------------------------
# t5: transformers' T5Attention is the oracle.


def hf_t5_attention(num_buckets, max_distance, heads):
  cfg = transformers.T5Config(d_model=32, d_kv=8, num_heads=heads, relative_attention_num_buckets=num_buckets,
                              relative_attention_max_distance=max_distance, is_decoder=False)
  return transformers.models.t5.modeling_t5.T5Attention(cfg, has_relative_attention_bias=True).eval()


@pytest.mark.parametrize('num_buckets,max_distance', [(32, 128), (8, 20), (6, 7), (64, 300), (16, 9)])
def test_t5_buckets_match_transformers_exhaustively(num_buckets, max_distance):
  from posjax.attention.t5 import relative_position_bucket
  rel = np.arange(-300, 301)
  theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      torch.tensor(rel), bidirectional=True, num_buckets=num_buckets, max_distance=max_distance).numpy()
  np.testing.assert_array_equal(relative_position_bucket(rel, num_buckets, max_distance), theirs)
  # Every bucket is reached but num_buckets/2: distance 0 counts as 'before', so 'after' starts one higher.
  assert set(np.unique(theirs)) == set(range(num_buckets)) - {num_buckets // 2}


@pytest.mark.parametrize('l,num_buckets,max_distance', [(17, 32, 128), (150, 32, 128), (40, 8, 20)])
def test_t5_bias_matches_transformers(l, num_buckets, max_distance):
  cfg = config('t5', t5_num_buckets=num_buckets, t5_max_distance=max_distance)
  q = jnp.zeros((1, l, 4, 8))
  module = component(cfg, 't5')
  params = random_params(module.init, q, q, jnp.ones((1, l), bool), scale=1.0)
  table = np.asarray(params['relative_attention_bias'])
  assert table.shape == (num_buckets, 4)
  hf = hf_t5_attention(num_buckets, max_distance, 4)
  with torch.no_grad():
    hf.relative_attention_bias.weight.copy_(torch.tensor(table))
    theirs = hf.compute_bias(l, l).numpy()
  table = module.apply({'params': params}, q, q, jnp.ones((1, l), bool))
  assert table.shape == (4, 2 * l - 1)  # over offsets j - i; the core spreads it (or the kernel uses it)
  ours = np.asarray(offsets.spread(table, l))
  assert ours.shape == theirs.shape == (1, 4, l, l)
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# alibi: the paper's reference code, transcribed.


def paper_slopes(n):
  """Press et al.'s `get_slopes`, transcribed from the paper's repository."""
  def power_of_2(n):
    start = 2 ** (-2 ** -(math.log2(n) - 3))
    return [start * start ** i for i in range(n)]
  if math.log2(n).is_integer():
    return power_of_2(n)
  closest = 2 ** math.floor(math.log2(n))
  return power_of_2(closest) + paper_slopes(2 * closest)[0::2][:n - closest]


@pytest.mark.parametrize('heads', [1, 2, 3, 4, 6, 8, 12, 16])
def test_alibi_bias_matches_paper(heads):
  l = 9
  q = jnp.zeros((1, l, heads, 8))
  cfg = config('alibi')
  module = component(cfg, 'alibi')
  assert not jax.eval_shape(module.init, jax.random.PRNGKey(0), q, q, jnp.ones((1, l), bool)).get('params')
  ours = np.asarray(offsets.spread(module.apply({}, q, q, jnp.ones((1, l), bool)), l))
  pos = np.arange(l)
  theirs = -np.asarray(paper_slopes(heads))[None, :, None, None] * np.abs(pos[:, None] - pos[None, :])
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
  if heads == 8:  # the paper's example: 1/2, 1/4, ..., 1/256
    np.testing.assert_allclose(-ours[0, :, 0, 1], [2.0 ** -i for i in range(1, 9)], rtol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# rope: a NumPy transcription (half-split pairs) and transformers' Llama rotary embedding.


def numpy_rope(x, base):
  """Rotate pair (i, i + Dh/2) of the vector at position p by p * base^(-2i/Dh)."""
  b, l, h, dh = x.shape
  out = np.empty_like(x, dtype=np.float64)
  for p in range(l):
    for i in range(dh // 2):
      theta = p * base ** (-2.0 * i / dh)
      a, c = x[:, p, :, i], x[:, p, :, i + dh // 2]
      out[:, p, :, i] = a * math.cos(theta) - c * math.sin(theta)
      out[:, p, :, i + dh // 2] = a * math.sin(theta) + c * math.cos(theta)
  return out


@pytest.mark.parametrize('base', [10000.0, 100.0])
def test_rope_matches_numpy_and_llama(base):
  cfg = config('rope', rope_base=base)
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 11, 4, 8)).astype(np.float32) for _ in range(3))
  mask = np.ones((2, 11), bool)
  qr, kr, vr = component(cfg, 'rope').apply({}, q, k, v, mask)
  np.testing.assert_allclose(np.asarray(qr), numpy_rope(q, base), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(kr), numpy_rope(k, base), atol=TOL, rtol=0)
  np.testing.assert_array_equal(np.asarray(vr), v)
  from transformers.models.llama import modeling_llama as llama
  lcfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, rope_theta=base)
  rot = llama.LlamaRotaryEmbedding(lcfg)
  qt = torch.tensor(q).transpose(1, 2)
  cos, sin = rot(qt, torch.arange(11)[None])
  q_llama, _ = llama.apply_rotary_pos_emb(qt, qt, cos, sin)
  np.testing.assert_allclose(np.asarray(qr), q_llama.transpose(1, 2).numpy(), atol=TOL, rtol=0)


def test_rope_scores_depend_only_on_offset():
  """The same q and k at every position: q_m . k_n after rotation is a function of m - n (Toeplitz)."""
  cfg = config('rope')
  rng = np.random.default_rng(1)
  l = 16
  q = np.broadcast_to(rng.normal(size=(1, 1, 4, 8)), (1, l, 4, 8)).astype(np.float32)
  k = np.broadcast_to(rng.normal(size=(1, 1, 4, 8)), (1, l, 4, 8)).astype(np.float32)
  qr, kr, _ = component(cfg, 'rope').apply({}, q, k, k, np.ones((1, l), bool))
  s = np.einsum('bihd,bjhd->bhij', np.asarray(qr), np.asarray(kr))
  np.testing.assert_allclose(s[..., 1:, 1:], s[..., :-1, :-1], atol=TOL, rtol=0)
  assert np.abs(s[..., 0, 1:] - s[..., 0, :1]).max() > 1e-2  # ... and does depend on it


# ---------------------------------------------------------------------------------------------------------
# sinusoidal: the formula of Vaswani et al. 2017.


@pytest.mark.parametrize('length,dim', [(50, 16), (7, 5)])
def test_sinusoid_table_matches_vaswani(length, dim):
  """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
  theirs = np.zeros((length, dim))
  for pos in range(length):
    for c in range(dim):
      angle = pos / 10000 ** ((c - c % 2) / dim)
      theirs[pos, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
  np.testing.assert_allclose(sinusoid_table(length, dim), theirs, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Properties through MultiHeadAttention: padding invariance, translation equivariance, grads, bfloat16.

PROPERTY_VARIANTS = [('relative_key', {'max_relative_position': 4}), ('relative_key_query', {}),
                     ('t5', {'t5_num_buckets': 8, 't5_max_distance': 6}), ('alibi', {}), ('rope', {}),
                     ('rope+alibi+t5', {})]


@pytest.fixture(scope='module', params=PROPERTY_VARIANTS, ids=[v for v, _ in PROPERTY_VARIANTS])
def mha(request):
  variant, options = request.param
  cfg = config(variant, **options)
  x = jnp.zeros((2, 12, 32))
  params = random_params(MultiHeadAttention(cfg).init, x, jnp.ones((2, 12), bool), scale=0.3)
  fns = {dtype: jax.jit(MultiHeadAttention(dataclasses.replace(cfg, dtype=dtype)).apply)
         for dtype in (jnp.float32, jnp.bfloat16)}
  return (lambda x, mask, dtype=jnp.float32: fns[dtype]({'params': params}, x, mask)), params, cfg


def test_padding_and_translation(mha):
  apply, _, _ = mha
  n, l, shift = 7, 12, 3
  x = np.random.default_rng(0).normal(size=(1, n, 32)).astype(np.float32)
  alone = np.asarray(apply(jnp.asarray(x), jnp.ones((1, n), bool)))[0]
  pad = lambda y, before: np.pad(y, ((0, 0), (before, l - n - before), (0, 0)))  # noqa: E731
  # Padding after the real tokens; the sequence moved inside padding; the tokens rotated by one.
  xs = np.concatenate([pad(x, 0), pad(x, shift), pad(np.roll(x, 1, axis=1), 0)])
  pos = np.arange(l)
  mask = np.stack([pos < n, (pos >= shift) & (pos < shift + n), pos < n])
  y = np.asarray(apply(jnp.asarray(xs), jnp.asarray(mask)))
  np.testing.assert_allclose(y[0, :n], alone, atol=TOL, rtol=0)
  np.testing.assert_allclose(y[1, shift:shift + n], alone, atol=TOL, rtol=0)
  # Positions matter at all: rotating the tokens does not just rotate the outputs. (Not a reversal: a
  # symmetric bias such as ALiBi's is invariant to it.)
  assert np.abs(np.roll(y[2, :n], -1, axis=0) - alone).max() > 1e-3


def test_grads_finite_and_bfloat16(mha):
  apply, params, cfg = mha
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 12, 32)), jnp.float32)
  mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [8], [5]]))
  mha_module = MultiHeadAttention(cfg)
  grads = jax.jit(jax.grad(lambda p: (mha_module.apply({'params': p}, x, mask) ** 2).sum()))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(g)).all(), path
    assert np.abs(np.asarray(g)).max() > 0, path  # every parameter reaches the output
  y32 = np.asarray(apply(x, mask))
  y16 = apply(x.astype(jnp.bfloat16), mask, jnp.bfloat16)
  assert y16.dtype == jnp.bfloat16
  y16 = np.asarray(y16.astype(jnp.float32))
  assert np.isfinite(y16).all()
  assert np.abs(y16 - y32)[mask].max() <= 0.05 * np.abs(y32).max()


# ---------------------------------------------------------------------------------------------------------
# Options and errors.


def test_options_are_registered_with_defaults():
  opts = registry.default_options()
  assert opts['max_relative_position'] == 512 and opts['relative_scaled'] is True
  assert opts['t5_num_buckets'] == 32 and opts['t5_max_distance'] == 128 and opts['rope_base'] == 10000.0
  for name in ('relative_key', 'relative_key_query', 't5', 'alibi'):
    assert registry.get(name).role == 'score'
  assert registry.get('rope').role == 'qkv'


@pytest.mark.parametrize('variant,options,hidden,match', [
    ('relative_key', {'max_relative_position': 0}, 32, 'max_relative_position'),
    ('relative_key_query', {'relative_scaled': 'yes'}, 32, 'relative_scaled'),
    ('relative_key', {'relative_block': 0}, 32, 'relative_block'),
    ('t5', {'t5_num_buckets': 7}, 32, 't5_num_buckets'),
    ('t5', {'t5_num_buckets': 32, 't5_max_distance': 8}, 32, 't5_max_distance'),
    ('rope', {'rope_base': 0.5}, 32, 'rope_base'),
    ('rope', {}, 36, 'even'),  # 4 heads of width 9
])
def test_bad_options_raise_one_line_config_errors(variant, options, hidden, match):
  """Checked when the model config is built, before any module runs."""
  with pytest.raises(ConfigError, match=match) as err:
    config(variant, hidden=hidden, **options)
  assert '\n' not in str(err.value)


@pytest.mark.parametrize('m,l,block', [(3, 7, 64), (9, 7, 3), (4, 6, 1), (40, 13, 4), (2, 1, 64)])
def test_relative_scores_gradients_match_numpy(m, l, block):
  """relative_scores has hand-written backward passes (the q.r product and the skew): its gradients against
  the formula's, written out in NumPy. With s[b,h,i,j] = x[b,i,h].r[d(i,j)], d = clip(i-j, +-(m-1)), and a
  loss sum(w*s): dx[b,i,h] = sum_j w[b,h,i,j] r[d(i,j)], dr[d] = sum over (b,h,i,j) with d(i,j)=d of
  w[b,h,i,j] x[b,i,h]."""
  from posjax.attention.relative import relative_scores
  rng = np.random.default_rng(m + 7 * l + block)
  x = rng.normal(size=(2, l, 3, 5)).astype(np.float32)
  table = rng.normal(size=(2 * m - 1, 5)).astype(np.float32)
  w = rng.normal(size=(2, 3, l, l)).astype(np.float32)
  dx, dr = jax.jit(jax.grad(lambda x, t: (w * relative_scores(x, t, m, block)).sum(), argnums=(0, 1)))(x, table)
  d = np.clip(np.arange(l)[:, None] - np.arange(l)[None, :], -(m - 1), m - 1) + m - 1  # LxL table rows
  want_dx = np.einsum('bhij,ijd->bihd', w, table[d])
  want_dr = np.zeros_like(table)
  np.add.at(want_dr, d.reshape(-1), np.einsum('bhij,bihd->ijd', w, x).reshape(l * l, -1))
  np.testing.assert_allclose(np.asarray(dx), want_dx, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dr), want_dr, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('length', [1, 2, 7])
def test_toeplitz_against_numpy_and_its_gradient_is_a_sum_over_diagonals(length):
  from posjax.attention.relative import toeplitz
  v = np.random.default_rng(0).normal(size=(3, 2 * length - 1)).astype(np.float32)
  want = np.array([[[v[h, (length - 1) + j - i] for j in range(length)] for i in range(length)] for h in range(3)])
  np.testing.assert_array_equal(toeplitz(jnp.asarray(v), length), want)
  d = np.random.default_rng(1).normal(size=(3, length, length)).astype(np.float32)
  (g,) = jax.vjp(lambda x: toeplitz(x, length), jnp.asarray(v))[1](jnp.asarray(d))
  want_g = np.zeros_like(v)
  for i in range(length):
    for j in range(length):
      want_g[:, (length - 1) + j - i] += d[:, i, j]
  np.testing.assert_allclose(g, want_g, rtol=1e-6, atol=1e-6)
