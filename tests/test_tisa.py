"""TISA (Wennberg & Henter 2021): e_hij += f_h(i - j), f_h(d) = sum_s a_hs exp(-|b_hs| (d - c_hs)^2).

The oracle is a NumPy transcription of that formula written here (float64), evaluated over a grid of i - j
and inside a NumPy multi-head attention.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import posjax
from helpers import random_params
from posjax.attention import offsets, registry
from posjax.errors import ConfigError

H, D = 4, 32
DH = D // H


def config(variant='tisa', kernels=3, **kw):
  return posjax.ModelConfig(vocab_size=53, hidden_size=D, num_layers=kw.pop('num_layers', 1), num_heads=H,
                            intermediate_size=40, max_position_embeddings=32, hidden_dropout=0.0,
                            attention_dropout=0.0, attention=variant,
                            attention_options=(('tisa_kernels', kernels),) if 'tisa' in variant else (), **kw)


def tisa_params(s, seed):
  """Amplitudes of both signs, sharpnesses of both signs (only |b| counts), offsets over several tokens."""
  rng = np.random.default_rng(seed)
  return {'amplitude': rng.normal(0.0, 1.0, (s, H)).astype(np.float32),
          'sharpness': rng.normal(0.0, 0.4, (s, H)).astype(np.float32),
          'offset': rng.normal(0.0, 3.0, (s, H)).astype(np.float32)}


def np_f(p, d):
  """f_h(d) for every head h, by the formula, one kernel at a time."""
  out = np.zeros(H)
  for s in range(p['amplitude'].shape[0]):
    a, b, c = (np.float64(p[n][s]) for n in ('amplitude', 'sharpness', 'offset'))
    out += a * np.exp(-np.abs(b) * (d - c) ** 2)
  return out


def tisa_bias(params, length, kernels=3):
  """posjax's term alone, bias_1xHxLxL, through the registry's build: its offset table spread over LxL."""
  module = registry.get('tisa').build(config(kernels=kernels), name='tisa')
  q = jnp.zeros((1, length, H, DH))
  table = jax.jit(lambda p: module.apply({'params': p}, q, q, jnp.ones((1, length), bool)))(params)
  return np.asarray(offsets.spread(table, length))


def test_bias_matches_formula_over_the_grid_of_distances():
  p = tisa_params(3, seed=0)
  bias = tisa_bias(p, 9)
  assert bias.shape == (1, H, 9, 9)
  for i in range(9):
    for j in range(9):
      np.testing.assert_allclose(bias[0, :, i, j], np_f(p, i - j), atol=1e-5, rtol=0, err_msg=f'i={i} j={j}')


def test_bias_depends_only_on_the_distance():
  p = tisa_params(3, seed=1)
  bias = tisa_bias(p, 9)[0]
  np.testing.assert_array_equal(bias[:, 1:, 1:], bias[:, :-1, :-1])  # constant along every diagonal
  np.testing.assert_allclose(tisa_bias(p, 5)[0], bias[:, :5, :5], atol=1e-6, rtol=0)  # whatever the length
  assert np.abs(bias[:, 0, 1] - bias[:, 1, 0]).max() > 1e-3  # f(-1) != f(1): not merely symmetric in i, j


def test_attention_with_tisa_matches_numpy_oracle():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 10, D)).astype(np.float32)
  mask = np.arange(10)[None, :] < np.array([[10], [6]])
  model = posjax.attention.MultiHeadAttention(config())
  params = random_params(model.init, x, mask, seed=3)
  params['tisa'] = tisa_params(3, seed=4)
  y = np.asarray(jax.jit(lambda p: model.apply({'params': p}, x, mask))(params))
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  proj = lambda n: np.einsum('bld,dhe->blhe', x, p[n]['kernel']) + p[n]['bias']  # noqa: E731
  q, k, v = proj('query'), proj('key'), proj('value')
  logits = np.einsum('bihe,bjhe->bhij', q, k) / math.sqrt(DH)
  for i in range(10):
    for j in range(10):
      logits[:, :, i, j] += np_f(p['tisa'], i - j)
  logits = np.where(mask[:, None, None, :], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ctx = np.einsum('bhij,bjhe->bihe', probs, v)
  want = np.einsum('bihe,hed->bid', ctx, p['out']['kernel']) + p['out']['bias']
  np.testing.assert_allclose(y[mask], want[mask], atol=1e-5, rtol=0)


def test_three_s_h_parameters_per_layer_and_no_position_embeddings():
  ids = jnp.ones((1, 8), jnp.int32)
  count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))  # noqa: E731
  tisa = nn.unbox(jax.eval_shape(posjax.Bert(config(kernels=3, num_layers=2)).init, jax.random.PRNGKey(0),
                                 ids)['params'])
  none = nn.unbox(jax.eval_shape(posjax.Bert(config('none', num_layers=2)).init, jax.random.PRNGKey(0),
                                 ids)['params'])
  for layer in ('layer_0', 'layer_1'):
    assert count(tisa['encoder'][layer]['attention']['tisa']) == 3 * 3 * H
  assert count(tisa) - count(none) == 2 * 3 * 3 * H
  assert 'position_embeddings' not in tisa['embeddings']


def test_initialisation_follows_the_official_code():
  """ulmewennberg/tisa `Tisa._init_weights`: offsets N(0, 5^2), amplitudes and sharpnesses N(0.1, 0.01^2).
  320 draws each (S = 5, H = 64); the bounds are over 5 standard errors wide."""
  module = registry.get('tisa').build(config(kernels=5), name='tisa')
  q = jnp.zeros((1, 4, 64, 2))
  params = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), q, q, jnp.ones((1, 4), bool))['params'])
  for name, (mean, std) in {'offset': (0.0, 5.0), 'amplitude': (0.1, 0.01), 'sharpness': (0.1, 0.01)}.items():
    draws = np.asarray(params[name])
    assert draws.shape == (5, 64)
    assert abs(draws.mean() - mean) < 5 * std / math.sqrt(320), name
    assert abs(draws.std() - std) < 5 * std / math.sqrt(640), name


def test_default_is_five_kernels_with_logical_axes():
  cfg = posjax.ModelConfig(vocab_size=53, hidden_size=D, num_layers=1, num_heads=H, intermediate_size=40,
                           attention='tisa')
  x, mask = jnp.zeros((1, 4, D)), jnp.ones((1, 4), bool)
  model = posjax.attention.MultiHeadAttention(cfg)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, mask)['params']
  for name in ('amplitude', 'sharpness', 'offset'):
    assert params['tisa'][name].value.shape == (5, H)
    assert params['tisa'][name].names == ('kernel', 'heads')


@pytest.mark.parametrize('bad', [0, -1, 2.0, True])
def test_bad_kernel_count_is_a_config_error(bad):
  x, mask = jnp.zeros((1, 4, D)), jnp.ones((1, 4), bool)
  with pytest.raises(ConfigError, match='tisa_kernels'):
    model = posjax.attention.MultiHeadAttention(config(kernels=bad))
    jax.eval_shape(model.init, jax.random.PRNGKey(0), x, mask)


@pytest.mark.parametrize('variant', ['tisa', 'tisa+convq'])
def test_padding_translation_gradients_bfloat16(variant):
  """Appended padding and a shift inside padding leave real tokens' outputs unchanged (shifted); gradients
  under jit are finite and reach the TISA parameters; bfloat16 runs close to float32."""
  model = posjax.attention.MultiHeadAttention(config(variant))
  rng = np.random.default_rng(5)
  seq = rng.standard_normal((1, 9, D)).astype(np.float32)
  params = random_params(model.init, seq, np.ones((1, 9), bool), seed=6)
  params['tisa'] = tisa_params(3, seed=7)
  fn = jax.jit(lambda p, x, m: model.apply({'params': p}, x, m))
  alone = np.asarray(fn(params, seq, np.ones((1, 9), bool)))
  x = rng.standard_normal((2, 16, D)).astype(np.float32)  # padding positions hold noise
  mask = np.zeros((2, 16), bool)
  x[0, :9], mask[0, :9] = seq[0], True
  x[1, 5:14], mask[1, 5:14] = seq[0], True
  out = np.asarray(fn(params, x, mask))
  np.testing.assert_allclose(out[0, :9], alone[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[1, 5:14], alone[0], atol=1e-5, rtol=0)

  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x, mask) ** 2)))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(g)).all(), path
  for name in ('amplitude', 'sharpness', 'offset'):
    assert np.abs(np.asarray(grads['tisa'][name])).max() > 0, name

  model16 = posjax.attention.MultiHeadAttention(config(variant, dtype=jnp.bfloat16))
  out16 = jax.jit(lambda p: model16.apply({'params': p}, x, mask))(params)
  assert out16.dtype == jnp.bfloat16
  out16 = np.asarray(out16, np.float32)
  assert np.isfinite(out16).all()
  np.testing.assert_allclose(out16[mask], out[mask], atol=0.1 * np.abs(out).max())
