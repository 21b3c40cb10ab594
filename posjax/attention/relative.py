"""Learned relative position embeddings in the attention logits, as in Hugging Face's BERT:

- `relative_key` (Shaw et al. 2018):         e_ij += q_i . r_{i-j}
- `relative_key_query` (Huang et al. 2020):  e_ij += q_i . r_{i-j} + k_j . r_{i-j}

One table per layer, `distance_embedding` R of shape (2M-1)xDh in HF's layout: row (i - j) + M - 1 holds
r_{i-j}, with M = `max_relative_position`. Distances beyond +-(M-1) use the edge rows (Shaw et al.'s
clipping; HF never sees them because it caps L at M). With `relative_scaled` (BERT) the term is divided by
sqrt(Dh) like q.k, since HF BERT adds it before scaling; without it (HF ALBERT) it is added unscaled.

Only the distances a length-L sequence has are looked up: q (and k) meet them in a product over distances
that a skew (pad-free reshape) turns into the BxHxLxL term, never building BxHxLxLxDh. Queries go in blocks
of `relative_block` rows: a block of b queries needs only b+L-1 of the 2L-1 distances, which cuts the extra
matmul work from ~2x to ~(b+L)/L x that of q.k (at L=512, b=64: 44% fewer FLOPs than one block).
Each block's product is a row-major (B*H*b)x(b+L-1) matrix. The product and the skew are plain dot_general,
reshapes and slices with autodiff's own derivatives, so forward-mode autodiff (jax.jvp, jacfwd) passes through.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from posjax import layers
from posjax.attention import flash, registry
from posjax.config import ModelConfig


def skew(s_xBxR, width: int | None = None):
  """out[..., i, j] = s[..., i, (b-1) - i + j] for b rows of width R, j < `width` (default: b), by the
  Transformer-XL reshape; needs width <= R - b + 1.

  Row i of the flattened array starts at i*R; dropping the first b-1 entries and re-reading rows of width
  R-1 moves row i's start to offset (b-1) - i within it, which is where column j = 0 lives. Plain reshapes and
  slices, so forward-mode autodiff passes through.
  """
  *batch, b, r = s_xBxR.shape
  width = b if width is None else width
  if b == 1:
    return s_xBxR[..., :width]
  flat = s_xBxR.reshape(*batch, b * r)[..., b - 1: b - 1 + b * (r - 1)]
  return flat.reshape(*batch, b, r - 1)[..., :width]


def toeplitz(v_xR, length: int):
  """out[..., i, j] = v[..., (L-1) + j - i] for i, j < L = `length`: a term that depends on j - i only,
  from its 2L-1 values at j - i = -(L-1)..L-1 (v_xR, R = 2L-1), as the skew of v repeated over L rows.

  Not an index of v by an LxL array: the gradient of such a gather is a scatter-add, which the TPU compiler
  lays out with v's leading axes (heads, batch) last, padded to 128 lanes: TISA's and T5's 1xHxLxL bias
  took 32x its size in temporaries at H=4. Reshapes, a broadcast and their transposes (a sum) have no such
  layout."""
  *batch, r = v_xR.shape
  if r != 2 * length - 1:
    raise ValueError(f'toeplitz: {r} values for length {length}; needs 2L-1 = {2 * length - 1}')
  return skew(jnp.broadcast_to(v_xR[..., None, :], (*batch, length, r)), length)


def block_dot(x_NxMxDh, r_NxRxDh):
  """s[n, m, r] = x[n, m] . r[n, r]: each query block against its own distances."""
  return jax.lax.dot_general(x_NxMxDh, r_NxRxDh, (((2,), (2,)), ((0,), (0,))))


def relative_scores(x_BxLxHxDh, table_RxDh, m: int, block: int):
  """s[b, h, i, j] = x_i . r_{i-j} (r clipped to distances +-(m-1)), BxHxLxL, in blocks of `block` rows."""
  bsz, l, h, dh = x_BxLxHxDh.shape
  blk = max(1, min(block, l))
  n = -(-l // blk)
  x = jnp.pad(x_BxLxHxDh, ((0, 0), (0, n * blk - l), (0, 0), (0, 0))).reshape(bsz, n, blk, h, dh)
  # Blocks first and each block's rows (b, h, i) together, so the product lies as N row-major
  # (B*H*b)xR matrices whose rows the skew reads contiguously.
  x_NxMxDh = jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(n, bsz * h * blk, dh)
  # Block k holds queries i = k*blk + i'; it needs distances from k*blk + blk-1 down to k*blk - (l-1).
  dist_NxR = (jnp.arange(n)[:, None] * blk + blk - 1) - jnp.arange(blk + l - 1)[None, :]
  r_NxRxDh = jnp.asarray(table_RxDh, x.dtype)[jnp.clip(dist_NxR, -(m - 1), m - 1) + m - 1]
  s_NxBxHxbxR = block_dot(x_NxMxDh, r_NxRxDh).reshape(n, bsz, h, blk, blk + l - 1)
  out_NxBxHxbxL = skew(s_NxBxHxbxR, l)
  return jnp.moveaxis(out_NxBxHxbxL, 0, 2).reshape(bsz, h, n * blk, l)[:, :, :l]


class RelativePosition(nn.Module):
  """Returns the relative score term, BxHxLxL, added to the scaled q.k logits; with `fused`, the
  `flash.Distances` from which the fused kernel computes that term tile by tile instead."""
  config: ModelConfig
  with_key: bool = False  # Huang et al.'s k_j . r_{i-j} as well
  fused: bool = False

  @nn.compact
  def __call__(self, q_BxLxHxDh, k_BxLxHxDh, mask_BxL, deterministic=True):
    del mask_BxL, deterministic  # padded keys are masked by the core; distances do not depend on padding
    cfg = self.config
    m, scaled = cfg.option('max_relative_position'), cfg.option('relative_scaled')
    dh = q_BxLxHxDh.shape[3]
    table_RxDh = self.param('distance_embedding', layers.init(cfg.initializer_range, ('pos', 'kv')),
                            (2 * m - 1, dh), cfg.param_dtype)
    if self.fused:
      return flash.Distances(table_RxDh, True, 'both' if self.with_key else 'query',
                             1.0 / dh ** 0.5 if scaled else 1.0)
    block = cfg.option('relative_block')
    term_BxHxLxL = relative_scores(q_BxLxHxDh, table_RxDh, m, block)
    if self.with_key:
      # k_j . r_{i-j} is, indexed by key j first, k_j . r'_{j-i} with r'_d = r_{-d}: the table reversed.
      term_BxHxLxL = term_BxHxLxL + jnp.swapaxes(relative_scores(k_BxLxHxDh, table_RxDh[::-1], m, block), -1, -2)
    if scaled:
      term_BxHxLxL = term_BxHxLxL / jnp.sqrt(jnp.asarray(dh, term_BxHxLxL.dtype))
    return term_BxHxLxL


_OPTIONS = (
    # M: the table covers distances -(M-1)..M-1 (HF: max_position_embeddings)
    registry.integer('max_relative_position', 512),
    registry.flag('relative_scaled', True),  # True: HF BERT (term / sqrt(Dh)); False: HF ALBERT (term unscaled)
    # query rows per block of the q.r product (speed only; results are identical)
    registry.integer('relative_block', 64),
)

registry.register(registry.Component(
    'relative_key', 'score', lambda cfg, name=None, **kw: RelativePosition(cfg, with_key=False, name=name, **kw),
    distances=True, paper='Shaw et al. 2018', params='(2M-1)*Dh', cost='O(B H L^2) extra logits, O(B H L (2L-1)) q.r',
    options=_OPTIONS))
registry.register(registry.Component(
    'relative_key_query', 'score', lambda cfg, name=None, **kw: RelativePosition(cfg, with_key=True, name=name, **kw),
    distances=True, paper='Huang et al. 2020', params='(2M-1)*Dh',
    cost='O(B H L^2) extra logits, O(B H L (2L-1)) q.r and k.r', options=_OPTIONS))
