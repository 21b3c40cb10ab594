"""Composite attention (Chang et al. 2021): `convfixed`, `convq`, `convk` score terms.

Oracles are NumPy transcriptions written here (float64), never posjax's implementation:
- each term straight from its formula, e_hij += w_{h,c(j-i)} | q_hi.r_{c(j-i)}/sqrt(Dh) |
  k_hj.r_{c(i-j)}/sqrt(Dh) with c(d) = clip(d, -k, k) + k (`convk` indexed by i - j, as the authors' code),
  inside a NumPy multi-head attention (and a NumPy one-layer BERT for `absolute+convfixed`);
- Chang et al.'s equivalences with the q.k term dropped (`use_qk=False`): `convfixed` is a softmax-normalised
  lightweight convolution of the values (Wu et al. 2019) and `convq` a dynamic lightweight convolution.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import posjax
from helpers import random_params
from posjax.errors import ConfigError

H, D = 4, 32
DH = D // H


def config(variant, kernel_size=5, use_qk=True, **kw):
  return posjax.ModelConfig(vocab_size=53, hidden_size=D, num_layers=1, num_heads=H, intermediate_size=40,
                            max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
                            attention=variant, attention_options=(('composite_kernel_size', kernel_size),
                                                                  ('use_qk', use_qk)), **kw)


def mha(cfg, x, mask, seed=0):
  """posjax's attention output and its (random) params, as NumPy."""
  model = posjax.attention.MultiHeadAttention(cfg)
  params = random_params(model.init, x, mask, seed=seed)
  y = jax.jit(lambda p, x, m: model.apply({'params': p}, x, m))(params, x, mask)
  return np.asarray(y, np.float64), jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


def batch(length=12, lengths=(12, 7), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((len(lengths), length, D)).astype(np.float32)
  mask = np.arange(length)[None, :] < np.array(lengths)[:, None]
  return x, mask


# ---- NumPy oracles -------------------------------------------------------------------------------------


def tap(i, j, k):
  """The tap of key j for query i: clip(j - i, -k, k) + k."""
  return min(max(j - i, -k), k) + k


def np_qkv(p, x):
  proj = lambda name: np.einsum('bld,dhe->blhe', x, p[name]['kernel']) + p[name]['bias']  # noqa: E731
  return proj('query'), proj('key'), proj('value')


def np_convfixed(p, q, k_, k):
  w = p['convfixed']['kernel']  # H x (2k+1)
  l = q.shape[1]
  term = np.zeros((1, w.shape[0], l, l))
  for i in range(l):
    for j in range(l):
      term[0, :, i, j] = w[:, tap(i, j, k)]
  return term


def np_convq(p, q, k_, k):
  r = p['convq']['kernel']  # (2k+1) x Dh
  b, l, h, dh = q.shape
  term = np.zeros((b, h, l, l))
  for i in range(l):
    for j in range(l):
      term[:, :, i, j] = q[:, i] @ r[tap(i, j, k)] / math.sqrt(dh)
  return term


def np_convk(p, q, k_, k):
  r = p['convk']['kernel']
  b, l, h, dh = q.shape
  term = np.zeros((b, h, l, l))
  for i in range(l):
    for j in range(l):
      term[:, :, i, j] = k_[:, j] @ r[tap(j, i, k)] / math.sqrt(dh)  # clip(i - j) + k
  return term


TERMS = {'convfixed': np_convfixed, 'convq': np_convq, 'convk': np_convk}


def np_attention(p, x, mask, terms, k, use_qk=True):
  q, k_, v = np_qkv(p, x)
  logits = np.einsum('bihe,bjhe->bhij', q, k_) / math.sqrt(DH) if use_qk else 0.0
  for name in terms:
    logits = logits + TERMS[name](p, q, k_, k)
  logits = np.where(mask[:, None, None, :], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ctx = np.einsum('bhij,bjhe->bihe', probs, v)
  return out_proj(p, ctx)


def out_proj(p, ctx):
  return np.einsum('bihe,hed->bid', ctx, p['out']['kernel']) + p['out']['bias']


def lightweight_conv(v, mask, w_HxT):
  """Wu et al.'s lightweight convolution, out_i = sum_t softmax(w_h)_t v_{i+t}, t = -m..m, as np.convolve.

  The softmax runs over the taps that land on real tokens (what attention's normaliser does at sequence ends
  and padding): out = conv(v with padding zeroed, e^w) / conv(real-token indicator, e^w).
  """
  b, l, h, dh = v.shape
  m = (w_HxT.shape[1] - 1) // 2
  vz = np.where(mask[:, :, None, None], v, 0.0)
  out = np.zeros_like(v)
  for bi in range(b):
    for hi in range(h):
      e = np.exp(w_HxT[hi] - w_HxT[hi].max())
      den = np.convolve(np.pad(mask[bi].astype(float), m), e[::-1], 'valid')
      for d in range(dh):
        with np.errstate(invalid='ignore'):  # 0/0 at padding with no real token in reach: never compared
          out[bi, :, hi, d] = np.convolve(np.pad(vz[bi, :, hi, d], m), e[::-1], 'valid') / den
  return out


def dynamic_conv(v, mask, kernel_fn, m):
  """Dynamic lightweight convolution: out_i = sum_t softmax_t(kernel_fn(b, h, i, t)) v_{i+t}, t = -m..m, by an
  explicit sliding window; the softmax runs over the taps on real tokens."""
  b, l, h, _ = v.shape
  out = np.zeros_like(v)
  for bi in range(b):
    for hi in range(h):
      for i in range(l):
        ts = [t for t in range(-m, m + 1) if 0 <= i + t < l and mask[bi, i + t]]
        logit = np.array([kernel_fn(bi, hi, i, t) for t in ts])
        wts = np.exp(logit - logit.max())
        wts /= wts.sum()
        out[bi, i, hi] = sum(wt * v[bi, i + t, hi] for wt, t in zip(wts, ts))
  return out


# ---- the terms against their formulas ------------------------------------------------------------------


@pytest.mark.parametrize('variant', ['convfixed', 'convq', 'convk', 'convq+convk', 'convfixed+convq+convk'])
def test_terms_match_numpy_oracle(variant):
  """Kernel 5 (k = 2) on 12 tokens, so most pairs are clipped; row 1 is padded after 7 tokens."""
  x, mask = batch()
  y, p = mha(config(variant, kernel_size=5), x, mask)
  want = np_attention(p, x, mask, variant.split('+'), k=2)
  np.testing.assert_allclose(y[mask], want[mask], atol=1e-5, rtol=0)
  # The terms matter: without them the oracle is far from the module.
  assert np.abs(np_attention(p, x, mask, [], k=2)[mask] - y[mask]).max() > 1e-2


def test_fused_kernel_matches_numpy_oracle():
  """The three terms in the fused TPU kernel (Pallas interpret mode): convfixed's taps as an offset table,
  convq's and convk's vectors on the query and key sides; same oracle, same tolerance."""
  x, mask = batch()
  y, p = mha(config('convfixed+convq+convk', kernel_size=5, attention_impl='pallas'), x, mask)
  np.testing.assert_allclose(y[mask], np_attention(p, x, mask, ['convfixed', 'convq', 'convk'], k=2)[mask],
                             atol=1e-5, rtol=0)


def test_convq_alone_without_qk_matches_oracle():
  x, mask = batch()
  y, p = mha(config('convq', kernel_size=7, use_qk=False), x, mask)
  np.testing.assert_allclose(y[mask], np_attention(p, x, mask, ['convq'], k=3, use_qk=False)[mask],
                             atol=1e-5, rtol=0)


def test_absolute_plus_convfixed_matches_numpy_bert():
  """One BERT layer in NumPy: (word + position + type embeddings) -> LN -> attention with convfixed -> FFN."""
  cfg = config('absolute+convfixed', kernel_size=5)
  rng = np.random.default_rng(3)
  ids = rng.integers(5, 53, size=(2, 11)).astype(np.int32)
  ids[1, 8:] = 0
  mask = ids != 0
  model = posjax.Bert(cfg)
  params = random_params(model.init, ids, seed=1, scale=0.2)
  hidden = np.asarray(jax.jit(lambda p: model.apply({'params': p}, ids, mask)['hidden_BxLxD'])(params))
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  assert p['embeddings']['position_embeddings']['embedding'].shape == (32, D)

  def ln(x, q):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-12) * q['scale'] + q['bias']

  e = p['embeddings']
  x = e['word_embeddings'][ids] + e['token_type_embeddings'][np.zeros_like(ids)] + \
      e['position_embeddings']['embedding'][np.arange(11)][None]
  x = ln(x, e['norm'])
  layer = p['encoder']['layer_0']
  x = ln(x + np_attention(layer['attention'], x, mask, ['convfixed'], k=2), layer['attention_norm'])
  hdn = x @ layer['intermediate']['kernel'] + layer['intermediate']['bias']
  hdn = 0.5 * hdn * (1 + erf(hdn / math.sqrt(2)))
  x = ln(x + hdn @ layer['output']['kernel'] + layer['output']['bias'], layer['output_norm'])
  np.testing.assert_allclose(hidden[mask], x[mask], atol=1e-5, rtol=0)


# ---- Chang et al.'s equivalences (use_qk=False) -----------------------------------------------------


def test_convfixed_alone_is_a_lightweight_convolution_within_the_window():
  """`convfixed` with use_qk=False == softmax-normalised lightweight convolution of v with weights w_h.

  Conditions for equality: every pair of real tokens lies inside the window (at most k+1 real tokens, here
  k = 4 and 5 and 3 real tokens), and the convolution's softmax runs over the taps on real tokens (attention
  renormalises at the sequence ends and masks padding, which is zeroed before convolving).
  """
  x, mask = batch(length=8, lengths=(5, 3))
  y, p = mha(config('convfixed', kernel_size=9, use_qk=False), x, mask)
  _, _, v = np_qkv(p, x)
  ctx = lightweight_conv(v, mask, p['convfixed']['kernel'])
  np.testing.assert_allclose(y[mask], out_proj(p, ctx)[mask], atol=1e-5, rtol=0)


def test_convfixed_clips_distant_positions_to_the_edge_taps():
  """Beyond the window the edge weights apply (the paper's clipping, as in Shaw et al.), so on 12 tokens with
  k = 2 the term equals a lightweight convolution spanning the sequence (taps -11..11) whose taps beyond +-2
  repeat w_{h,-2} and w_{h,+2}; a convolution that excludes them (taps -2..2 only) is a different function."""
  x, mask = batch(length=12, lengths=(12, 9))
  y, p = mha(config('convfixed', kernel_size=5, use_qk=False), x, mask)
  _, _, v = np_qkv(p, x)
  w = p['convfixed']['kernel']
  tied = w[:, np.clip(np.arange(-11, 12), -2, 2) + 2]
  np.testing.assert_allclose(y[mask], out_proj(p, lightweight_conv(v, mask, tied))[mask], atol=1e-5, rtol=0)
  excluded = out_proj(p, lightweight_conv(v, mask, w))
  assert np.abs(excluded[mask] - y[mask]).max() > 1e-2


@pytest.mark.parametrize('length,lengths,kernel_size', [(8, (5, 3), 9), (12, (12, 9), 5)])
def test_convq_alone_is_a_dynamic_lightweight_convolution(length, lengths, kernel_size):
  """`convq` with use_qk=False == dynamic lightweight convolution of v whose kernel at position i is
  softmax over the taps of q_i.r_t / sqrt(Dh).

  Same conditions as for `convfixed`: the softmax runs over the taps on real tokens, and either all real
  tokens lie within the window (first case, k = 4), or the convolution spans the sequence with the taps beyond
  +-k using r_{+-k} (second case, k = 2 on 12 tokens: the paper's clipping).
  """
  x, mask = batch(length=length, lengths=lengths)
  k = (kernel_size - 1) // 2
  y, p = mha(config('convq', kernel_size=kernel_size, use_qk=False), x, mask)
  q, _, v = np_qkv(p, x)
  r = p['convq']['kernel']
  kern = lambda b, h, i, t: q[b, i, h] @ r[min(max(t, -k), k) + k] / math.sqrt(DH)  # noqa: E731
  ctx = dynamic_conv(v, mask, kern, m=length - 1)
  np.testing.assert_allclose(y[mask], out_proj(p, ctx)[mask], atol=1e-5, rtol=0)


# ---- options and parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize('variant,name,shape', [('convfixed', 'convfixed', (H, 7)),
                                                ('convq', 'convq', (7, DH)), ('convk', 'convk', (7, DH))])
def test_kernel_size_sets_the_table_and_its_axes(variant, name, shape):
  x, mask = batch(length=6, lengths=(6, 4))
  model = posjax.attention.MultiHeadAttention(config(variant, kernel_size=7))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, mask)
  box = variables['params'][name]['kernel']
  assert box.value.shape == shape
  assert box.names == (('heads', 'kernel') if name == 'convfixed' else ('kernel', 'kv'))


def test_default_kernel_size_is_17():
  cfg = posjax.ModelConfig(vocab_size=53, hidden_size=D, num_layers=1, num_heads=H, intermediate_size=40,
                           attention='convfixed')
  x, mask = batch(length=4, lengths=(4, 4))
  model = posjax.attention.MultiHeadAttention(cfg)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, mask)['params']
  assert nn.unbox(params)['convfixed']['kernel'].shape == (H, 17)


@pytest.mark.parametrize('bad', [4, 0, -3, 5.0, True, '5'])
def test_bad_kernel_size_is_a_config_error(bad):
  x, mask = batch(length=4, lengths=(4, 4))
  with pytest.raises(ConfigError, match='composite_kernel_size'):
    jax.eval_shape(posjax.attention.MultiHeadAttention(config('convq', kernel_size=bad)).init,
                   jax.random.PRNGKey(0), x, mask)


# ---- properties --------------------------------------------------------------------------------------------

VARIANTS = ['convfixed', 'convq', 'convk', 'convq+convk']


@pytest.mark.parametrize('variant', VARIANTS)
def test_padding_and_translation(variant):
  """Appended padding leaves real tokens unchanged; a sequence shifted inside padding shifts the outputs."""
  model = posjax.attention.MultiHeadAttention(config(variant, kernel_size=5))
  rng = np.random.default_rng(5)
  seq = rng.standard_normal((1, 9, D)).astype(np.float32)
  params = random_params(model.init, seq, np.ones((1, 9), bool), seed=2)
  fn = jax.jit(lambda x, m: model.apply({'params': params}, x, m))
  alone = np.asarray(fn(seq, np.ones((1, 9), bool)))
  x = rng.standard_normal((2, 16, D)).astype(np.float32)  # padding positions hold noise
  mask = np.zeros((2, 16), bool)
  x[0, :9], mask[0, :9] = seq[0], True
  x[1, 5:14], mask[1, 5:14] = seq[0], True
  out = np.asarray(fn(x, mask))
  np.testing.assert_allclose(out[0, :9], alone[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[1, 5:14], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize('variant', VARIANTS)
def test_finite_gradients_under_jit_and_bfloat16(variant):
  x, mask = batch(length=10, lengths=(10, 6))
  cfg = config(variant, kernel_size=5)
  model = posjax.attention.MultiHeadAttention(cfg)
  params = random_params(model.init, x, mask, seed=4)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x, mask) ** 2)))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(g)).all(), path
  for name in variant.split('+'):
    assert np.abs(np.asarray(grads[name]['kernel'])).max() > 0, name
  ref = np.asarray(jax.jit(lambda p: model.apply({'params': p}, x, mask))(params))
  model16 = posjax.attention.MultiHeadAttention(config(variant, kernel_size=5, dtype=jnp.bfloat16))
  out = jax.jit(lambda p: model16.apply({'params': p}, x, mask))(params)
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out, np.float32)
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out[mask], ref[mask], atol=0.1 * np.abs(ref).max())
