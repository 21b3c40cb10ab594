"""`convqkv` and `convvalues` (Chang et al. 2021) against a NumPy transcription of their formulas in the whole
attention with explicit sliding-window convolutions, one per option setting; then padding invariance,
translation equivariance, finite gradients and bfloat16 for non-default settings of all three convolution
components (tests/test_variants.py covers the defaults). tests/test_chang.py holds them against the authors'
own code."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posjax import ModelConfig
from posjax.attention import MultiHeadAttention
from posjax.errors import ConfigError

B, L, D, H = 2, 10, 32, 4
DH = D // H
TOL = 1e-5


def config(attention, dtype=jnp.float32, **opts):
  return ModelConfig(vocab_size=50, hidden_size=D, num_heads=H, num_layers=1, intermediate_size=37,
                     attention=attention, attention_options=tuple(sorted(opts.items())), dtype=dtype)


def perturbed_params(cfg, seed=0):
  """Random values for every parameter (zero-initialised biases must be seen too), drawn with NumPy from the
  parameter shapes: compiling a jitted init costs far more than these tests."""
  shapes = nn.unbox(jax.eval_shape(MultiHeadAttention(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, L, D)),
                                   jnp.ones((1, L), bool))['params'])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def padded_batch(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, L, D)).astype(np.float32)  # padding holds non-zero garbage on purpose
  mask = np.ones((B, L), bool)
  mask[1, 6:] = False
  return x, mask


# ---- the NumPy oracle ------------------------------------------------------------------------------------

def np_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_full_conv(x_BxLxD, w_KxDgxC, b_C, groups):
  """torch Conv1d(D, C, K, groups, padding=K//2) as a loop over output positions, taps and channels."""
  b, l, d = x_BxLxD.shape
  k, dg, c = w_KxDgxC.shape
  cg = c // groups
  y = np.zeros((b, l, c)) + b_C
  for i in range(l):
    for t in range(k):
      j = i + t - k // 2
      if not 0 <= j < l:
        continue
      for o in range(c):
        g = o // cg
        y[:, i, o] += x_BxLxD[:, j, g * dg:(g + 1) * dg] @ w_KxDgxC[t, :, o]
  return y


def np_depthwise_conv(x_BxLxC, w_KxC, b_C):
  b, l, c = x_BxLxC.shape
  k = w_KxC.shape[0]
  y = np.zeros((b, l, c)) + b_C
  for i in range(l):
    for t in range(k):
      j = i + t - k // 2
      if 0 <= j < l:
        y[:, i, :] += w_KxC[t] * x_BxLxC[:, j, :]
  return y


def np_convqkv(x_BxLxD, p, opts):
  """The convolved heads of one target from the hidden states (padding already zeroed): BxLxHcxDh."""
  hc = H // 2 if opts.get('convqkv_mixed', True) else H
  c = hc * DH
  if opts.get('convqkv_separable', True):
    y = np_depthwise_conv(x_BxLxD, p['depthwise'], p['depthwise_bias'])
    if opts.get('convqkv_activation', False):
      y = np_gelu(y)
    y = y @ p['pointwise']['kernel'].reshape(D, c) + p['pointwise']['bias'].reshape(c)
  else:
    k, dg = p['kernel'].shape[:2]
    y = np_full_conv(x_BxLxD, p['kernel'].reshape(k, dg, c), p['bias'].reshape(c), opts.get('convqkv_groups', 1))
  return y.reshape(B, L, hc, DH)


def np_attention(params, x, mask, variant, opts):
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  x = x.astype(np.float64)
  if 'convqkv' in variant:
    x = x * mask[:, :, None]  # hidden states zeroed at padding before every projection
  qkv = []
  for t, name in (('q', 'query'), ('k', 'key'), ('v', 'value')):
    parts = []
    if 'convqkv' in variant and t in opts.get('convqkv_targets', 'qkv'):
      parts.append(np_convqkv(x, p['convqkv'][name], opts))  # the first heads, convolved
    if name in p:  # the linear projection of the other heads
      parts.append(np.einsum('bld,dhe->blhe', x, p[name]['kernel']) + p[name]['bias'])
    qkv.append(np.concatenate(parts, axis=2))
  q, k, v = qkv
  logits = np.einsum('bqhe,bkhe->bhqk', q, k) / math.sqrt(DH)
  logits = np.where(mask[:, None, None, :], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ctx = np.einsum('bhqk,bkhe->bqhe', probs, v)
  if 'convvalues' in variant:
    pv = p['convvalues']
    kk = pv['kernel'].shape[0]
    conv = np_depthwise_conv((v * mask[:, :, None, None]).reshape(B, L, D), pv['kernel'].reshape(kk, D),
                             pv['bias'].reshape(D)).reshape(B, L, H, DH)
    if opts.get('convvalues_scale', False):
      conv = conv * pv['scale'][:, None]
    ctx = ctx + conv
  return np.einsum('blhe,hed->bld', ctx, p['out']['kernel']) + p['out']['bias']


ORACLE_CASES = [
    ('convqkv', {}),  # separable, no activation, half the heads, q k and v, width 9
    ('convqkv', dict(convqkv_activation=True, convqkv_mixed=False, convqkv_targets='q', convqkv_kernel_size=3)),
    ('convqkv', dict(convqkv_separable=False, convqkv_targets='kv', convqkv_kernel_size=5)),
    ('convqkv', dict(convqkv_separable=False, convqkv_groups=4, convqkv_mixed=False, convqkv_targets='vq',
                     convqkv_kernel_size=3)),
    ('convqkv', dict(convqkv_separable=False, convqkv_groups=8, convqkv_targets='q', convqkv_kernel_size=3)),
    ('convqkv', dict(convqkv_separable=False, convqkv_groups=2, convqkv_targets='k')),
    ('convvalues', {}),
    ('convvalues', dict(convvalues_scale=True, convvalues_kernel_size=3)),
    ('convqkv+convvalues', dict(convqkv_targets='v', convqkv_kernel_size=3, convvalues_kernel_size=5)),
]


@pytest.mark.parametrize('variant,opts', ORACLE_CASES)
def test_matches_numpy_transcription(variant, opts):
  cfg = config(variant, **opts)
  params = perturbed_params(cfg)
  x, mask = padded_batch()
  ours = np.asarray(jax.jit(MultiHeadAttention(cfg).apply)({'params': params}, x, mask))
  want = np_attention(params, x, mask, variant, opts)
  # Every output row, padding rows included, follows the formula with the hidden states zeroed at padding.
  np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)


@pytest.mark.parametrize('opts', [{}, dict(convqkv_mixed=False, convvalues_scale=True),
                                  dict(convqkv_separable=False, convqkv_groups=2)])
def test_every_parameter_has_logical_axis_names(opts):
  cfg = config('convqkv+convvalues', **opts)
  params = jax.eval_shape(MultiHeadAttention(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, L, D)),
                          jnp.ones((1, L), bool))['params']
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
  names = {jax.tree_util.keystr(p) for p, _ in leaves}
  # Mixed: the linear projections keep the other half of the heads; not mixed: there are none.
  assert ("['query']['kernel']" in names) == (opts.get('convqkv_mixed', True))


# ---- properties for non-default settings -----------------------------------------------------------------

PROPERTY_CASES = [
    ('convqkv', dict(convqkv_separable=False, convqkv_groups=2, convqkv_mixed=False, convqkv_kernel_size=5)),
    ('convqkv', dict(convqkv_activation=True, convqkv_targets='kv', convqkv_kernel_size=3)),
    ('convvalues', dict(convvalues_scale=True, convvalues_kernel_size=5)),
    ('convbert', dict(convbert_kernel_size=3)),
    ('convbert+convqkv+convvalues', dict(convbert_kernel_size=5, convqkv_kernel_size=3, convvalues_scale=True)),
]


@pytest.mark.parametrize('variant,opts', PROPERTY_CASES)
def test_padding_invariant_and_translation_equivariant(variant, opts):
  cfg = config(variant, **opts)
  params = perturbed_params(cfg, seed=1)
  rng = np.random.default_rng(1)
  seq = rng.normal(size=(5, D)).astype(np.float32)
  x = rng.normal(size=(2, 12, D)).astype(np.float32) * 3.0  # garbage around the sequence
  mask = np.zeros((2, 12), bool)
  x[0, :5], mask[0, :5] = seq, True  # 7 padding positions after it
  x[1, 4:9], mask[1, 4:9] = seq, True  # the same tokens shifted by 4: padding on both sides
  out = np.asarray(jax.jit(MultiHeadAttention(cfg).apply)({'params': params}, x, mask))
  np.testing.assert_allclose(out[1, 4:9], out[0, :5], atol=TOL, rtol=0)


def test_gradients_finite_under_jit_and_bfloat16_runs():
  variant, opts = PROPERTY_CASES[-1]
  cfg = config(variant, **opts)
  params = perturbed_params(cfg, seed=2)
  x, mask = padded_batch(2)
  model = MultiHeadAttention(cfg)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x, mask) ** 2)))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(g)).all(), path
    assert np.abs(np.asarray(g)).max() > 0, f'no gradient reaches {jax.tree_util.keystr(path)}'
  bf16 = MultiHeadAttention(config(variant, dtype=jnp.bfloat16, **opts))
  out = jax.jit(bf16.apply)({'params': params}, x, mask)
  assert out.dtype == jnp.bfloat16
  ref = jax.jit(model.apply)({'params': params}, x, mask)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=0.1 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize('opts,match', [
    (dict(convqkv_kernel_size=4), 'convqkv_kernel_size'),
    (dict(convqkv_targets='qx'), 'convqkv_targets'),
    (dict(convqkv_targets=''), 'convqkv_targets'),
    (dict(convqkv_separable=False, convqkv_groups=3), 'convqkv_groups'),
    (dict(convqkv_separable=False, convqkv_groups=32), 'convqkv_groups'),  # divides D=32, not Hc*Dh=16
    (dict(convvalues_kernel_size=0), 'convvalues_kernel_size'),
])
def test_bad_options_name_the_option(opts, match):
  with pytest.raises(ConfigError, match=match):
    cfg = config('convqkv+convvalues', **opts)
    jax.eval_shape(MultiHeadAttention(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 5, D)),
                   jnp.ones((1, 5), bool))
