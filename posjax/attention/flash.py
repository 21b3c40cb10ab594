"""Fused attention with the position terms computed per tile: a Pallas flash-attention kernel (TPU Mosaic
here, its GPU form for Pallas' Triton backend in `flash_gpu`; either in Pallas interpret mode on the CPU)
that takes every content-free score term as one table over offsets.

    ctx = softmax(scale q.k + table[h, j - i] + distance terms, padded keys masked) . v
                                                                              float32 softmax statistics

`table_HxR` is the sum of the variant's offset tables (`posjax.attention.offsets`, R = 2L-1, d = j - i), so
what enters the kernel is O(H L); no [B|1]xHxLxL bias exists in the forward or the backward pass. The
backward pass recomputes each tile's probabilities from the forward pass's row maxima and sums (BxHxL each)
and returns the table's gradient, a per-diagonal sum of the logits' gradient, accumulated tile by tile and
row by row in an Hx(2L) buffer (the dk/dv kernel runs each head's rows in turn).

How a tile finds its terms. The table is laid out in rows of 128 lanes (one TPU vector register wide): row n
holds offsets d = 128 (n - n0) + x, lanes x = 0..127, n0 = Lp / 128 (Lp: the length padded to the block).
A 128 x 128 sub-tile whose first key is 128 D positions after its first query sees d = 128 D + (c - r) at
query row r, key column c: lane (c - r) of row n0 + D where c >= r, lane (c - r + 128) of row n0 + D - 1
elsewhere. So each sub-tile needs two table rows and one lane gather by (c - r) mod 128 per row; its
gradient is the reverse, a gather by (x + r) mod 128 then a sum over rows. Both gathers stay inside one
128-lane register, which is what Mosaic lowers (`jnp.take_along_axis` -> `tpu.dynamic_gather`); a strided
`pltpu.roll` only rotates by non-negative row strides, enough for the forward but not the gradient.

Terms over distance vectors (`Distances`: Shaw's `relative_key` q_i . r_{i-j}, Huang's `relative_key_query`
adding k_j . r_{i-j}, Chang et al.'s `convq` q_i . r_{c(j-i)} and `convk` k_j . r_{c(i-j)}, any number of them)
enter as the terms' vectors, scaled and summed per side, by offset in rows of 128 x Dh: one such input for
the query side and one for the key side (one for both when every term is on both, as relative_key_query).
Rows of their own go only as far as the terms reach before their edge vectors (`distance_rows`: 4 rows for
convq/convk's +-8, 10 for relative_key's +-511, whatever L); a row of edge vectors stands for every offset
beyond. A sub-tile's q times the two rows it meets (two 128 x Dh x 128 products) gives q_r . r[128 D + x] in
lane x, and the lane gather above picks each query row's offsets; the key term is the same on the transposed
sub-tile. A sub-tile beyond the reach meets one edge vector, whose product with each query (key) is a row
sum, not a matmul. Backward, the inverse gather gives the gradient of those products, whence dq (dq
kernel), dk and the rows' gradients (dk/dv kernel, in a buffer per head and per row array).

Masking follows jax.nn.dot_product_attention: a masked key's logit is -0.7 * float32 max (a row with every
key masked attends uniformly, as in the XLA path) and its gradient is zero; the keys added to pad L up to
the block get -inf, so they never count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from posjax.attention import flash_gpu, offsets, registry
from posjax.errors import ConfigError

LANES = 128
MASKED = float(-0.7 * np.finfo(np.float32).max)  # jax.nn.dot_product_attention's logit of a masked key
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_SQ = pl.Squeezed()


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Static shape of one call: query/key block sizes (multiples of 128) and the padded length."""
  q: int
  k: int
  length: int  # Lp, a multiple of both blocks

  @property
  def n0(self) -> int:
    return self.length // LANES

  @property
  def rows(self) -> int:  # table rows: offsets -Lp .. Lp-1
    return 2 * self.length // LANES


def blocks(length: int, block_q: int | None = None, block_k: int | None = None) -> Blocks:
  """Blocks for a sequence of `length`: by default the largest of 512, 256, 128 dividing the length rounded
  up to 128 (few grid steps, little padding)."""
  lp = -(-length // LANES) * LANES
  default = next(b for b in (512, 256, LANES) if lp % b == 0)
  bq, bk = block_q or default, block_k or default
  if bq % LANES or bk % LANES:
    raise ValueError(f'block sizes must be multiples of {LANES}; got {bq}, {bk}')
  step = bq * bk // np.gcd(bq, bk)
  return Blocks(bq, bk, -(-length // step) * step)


def table_rows(table_HxR, length: int, b: Blocks):
  """table_HxR over d = -(L-1)..L-1 -> tab_HxNx128 over d = -Lp..Lp-1 (zeros outside the sequence)."""
  t = jnp.pad(table_HxR.astype(jnp.float32), ((0, 0), (b.length - (length - 1), b.length - length)))
  return t.reshape(t.shape[0], b.rows, LANES)


# --- pieces of the kernels ------------------------------------------------------------------------------

def _iota(dim):
  return jax.lax.broadcasted_iota(jnp.int32, (LANES, LANES), dim)


def _take(x, idx):
  return jnp.take_along_axis(x, idx, axis=1, mode='promise_in_bounds')


def _row(tab_ref, n):
  return jnp.broadcast_to(tab_ref[pl.ds(n, 1), :], (LANES, LANES))


def _bias(tab_ref, d, b: Blocks):
  """bias_QxK of the tile whose first key is 128 d positions after its first query."""
  r, c = _iota(0), _iota(1)
  idx, upper = (c - r) & (LANES - 1), c >= r
  rows = []
  for a in range(b.q // LANES):
    cols = []
    for kb in range(b.k // LANES):
      n = b.n0 + d + kb - a
      cols.append(jnp.where(upper, _take(_row(tab_ref, n), idx), _take(_row(tab_ref, n - 1), idx)))
    rows.append(jnp.concatenate(cols, axis=1) if len(cols) > 1 else cols[0])
  return jnp.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]


def _add_diagonal_sums(dtab_ref, ds_QxK, d, b: Blocks):
  """dtab[offset] += the sum of ds over each diagonal of the tile (the transpose of `_bias`)."""
  r, x = _iota(0), _iota(1)
  idx, low = (x + r) & (LANES - 1), x + r < LANES
  for a in range(b.q // LANES):
    for kb in range(b.k // LANES):
      g = _take(ds_QxK[a * LANES:(a + 1) * LANES, kb * LANES:(kb + 1) * LANES], idx)
      pos = jnp.sum(jnp.where(low, g, 0.0), axis=0, keepdims=True)
      neg = jnp.sum(g, axis=0, keepdims=True) - pos
      n = b.n0 + d + kb - a
      dtab_ref[pl.ds(n, 1), :] += pos
      dtab_ref[pl.ds(n - 1, 1), :] += neg


def _dot_nt(x, y):
  return jax.lax.dot_general(x, y, _NT, preferred_element_type=jnp.float32)


def _dot(x, y):
  return jax.lax.dot(x, y, preferred_element_type=jnp.float32)


def _reach_rows(t, reach: int):
  """The rows of a distance array (`distance_rows`) holding offsets 128 t + x and 128 (t - 1) + x, x = 0..127:
  beyond the `reach` rows each side every offset reads its edge vector, so t is clamped to an edge row. Where
  both are the same row, the sub-tile sees one vector at every offset (`_edge`)."""
  return tuple(jnp.clip(u, -(reach + 1), reach) + reach + 1 for u in (t, t - 1))


def _edge(ref, n):
  """The one vector (1 x Dh, float32) of an edge row."""
  return ref[n, pl.ds(0, 1), :].astype(jnp.float32)


def _rowdot(x, e_1xD):
  """x_NxD . e for each row, N x 1, in float32 (no MXU pass for one vector)."""
  return jnp.sum(x.astype(jnp.float32) * e_1xD, axis=1, keepdims=True)


def _distance_bias(q, k, relq_ref, relk_ref, d, b: Blocks, reach: int):
  """bias_QxK of q_i . rq[j - i] + k_j . rk[j - i] at the tile whose first key is 128 d positions after its
  first query; relq_ref and relk_ref (either may be None, or both the same ref) hold the vectors by
  key-minus-query offset in rows of 128 (as the table), scale included. A 128 x 128 sub-tile meets two
  rows: q . r over both is two small products, and each query row picks its offsets by the lane gather of
  `_bias`; the key term is the same gather on the transposed sub-tile (row: key, column: query). A sub-tile
  beyond the terms' reach meets only edge vectors: q_i . e, the same for all its keys (k_j . e for all its
  queries), one product per row instead."""
  r, c = _iota(0), _iota(1)
  upper, idx, idx_t = c >= r, (c - r) & (LANES - 1), (r - c) & (LANES - 1)
  rows = []
  for a in range(b.q // LANES):
    qa = q[a * LANES:(a + 1) * LANES]
    cols = []
    for kb in range(b.k // LANES):
      n, n1 = _reach_rows(d + kb - a, reach)
      kc = k[kb * LANES:(kb + 1) * LANES]

      def full(n=n, n1=n1, kc=kc):
        t = jnp.zeros((LANES, LANES), jnp.float32)
        if relq_ref is not None:
          cur, prev = relq_ref[n], relq_ref[n1]
          t = t + jnp.where(upper, _take(_dot_nt(qa, cur), idx), _take(_dot_nt(qa, prev), idx))
        if relk_ref is not None:
          cur, prev = relk_ref[n], relk_ref[n1]
          t = t + jnp.where(r >= c, _take(_dot_nt(kc, cur), idx_t), _take(_dot_nt(kc, prev), idx_t)).T
        return t

      def edge(n=n, kc=kc):
        t = jnp.zeros((LANES, LANES), jnp.float32)
        if relq_ref is not None:
          t = t + _rowdot(qa, _edge(relq_ref, n))
        if relk_ref is not None:
          t = t + _rowdot(kc, _edge(relk_ref, n)).T
        return t
      cols.append(jax.lax.cond(n == n1, edge, full))
    rows.append(jnp.concatenate(cols, axis=1) if len(cols) > 1 else cols[0])
  return jnp.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]


def _split(g, lower):
  """(the part of a gathered gradient for row n of the offsets, the part for row n - 1)."""
  pos = jnp.where(lower, g, 0.0)
  return pos, g - pos


def _distance_dq(ds_QxK, relq_ref, d, b: Blocks, reach: int):
  """dq_QxDh of the query term of `_distance_bias` for the logits' gradient ds: per sub-tile the inverse lane
  gather (x + r) of `_add_diagonal_sums`, split by which of the two rows the offset lies in, times them;
  beyond the reach, each row's sum times the edge vector."""
  r, x = _iota(0), _iota(1)
  idx, low = (x + r) & (LANES - 1), x + r < LANES
  dq_rows = []
  for a in range(b.q // LANES):
    dq_a = None
    for kb in range(b.k // LANES):
      n, n1 = _reach_rows(d + kb - a, reach)
      ds = ds_QxK[a * LANES:(a + 1) * LANES, kb * LANES:(kb + 1) * LANES]

      def full(n=n, n1=n1, ds=ds):
        cur, prev = relq_ref[n], relq_ref[n1]
        pos, neg = _split(_take(ds, idx), low)
        return _dot(pos.astype(cur.dtype), cur) + _dot(neg.astype(prev.dtype), prev)

      def edge(n=n, ds=ds):
        return jnp.sum(ds, axis=1, keepdims=True) * _edge(relq_ref, n)
      term = jax.lax.cond(n == n1, edge, full)
      dq_a = term if dq_a is None else dq_a + term
    dq_rows.append(dq_a)
  return jnp.concatenate(dq_rows, axis=0) if len(dq_rows) > 1 else dq_rows[0]


def _distance_dk_and_rows(ds_QxK, q, k, relk_ref, drelq_ref, drelk_ref, d, b: Blocks, reach: int):
  """The rest of `_distance_bias`' transpose, for the dk/dv kernel: adds the query term's rows' gradient to
  drelq_ref and the key term's to drelk_ref (either None where the term is absent; the same ref where the
  two terms share their vectors) and returns dk_KxDh of the key term, or None. The key term's gradient is
  the query term's on ds transposed. Beyond the reach an edge row's gradient goes to its first lane: every
  lane of it holds the same vectors, whose gradient `distance_rows` sums over the lanes."""
  r, x = _iota(0), _iota(1)
  idx, low = (x + r) & (LANES - 1), x + r < LANES
  idx_t, low_t = (r - x) & (LANES - 1), x <= r
  dh = q.shape[-1]
  dk_cols = [None] * (b.k // LANES)
  for a in range(b.q // LANES):
    qa = q[a * LANES:(a + 1) * LANES]
    for kb in range(b.k // LANES):
      n, n1 = _reach_rows(d + kb - a, reach)
      ds = ds_QxK[a * LANES:(a + 1) * LANES, kb * LANES:(kb + 1) * LANES]
      kc = k[kb * LANES:(kb + 1) * LANES]

      def full(n=n, n1=n1, ds=ds, kc=kc):
        dk = jnp.zeros((LANES, dh), jnp.float32)
        if drelq_ref is not None:
          pos, neg = _split(_take(ds, idx), low)
          drelq_ref[n] += _dot(pos.T.astype(qa.dtype), qa)
          drelq_ref[n1] += _dot(neg.T.astype(qa.dtype), qa)
        if drelk_ref is not None:
          pos, neg = _split(_take(ds.T, idx_t), low_t)
          cur, prev = relk_ref[n], relk_ref[n1]
          dk = _dot(pos.astype(cur.dtype), cur) + _dot(neg.astype(prev.dtype), prev)
          drelk_ref[n] += _dot(pos.T.astype(kc.dtype), kc)
          drelk_ref[n1] += _dot(neg.T.astype(kc.dtype), kc)
        return dk

      def edge(n=n, ds=ds, kc=kc):
        dk = jnp.zeros((LANES, dh), jnp.float32)
        if drelq_ref is not None:
          _add_first_lane(drelq_ref, n, jnp.sum(jnp.sum(ds, axis=1, keepdims=True) * qa.astype(jnp.float32),
                                                axis=0, keepdims=True))
        if drelk_ref is not None:
          col_sums = jnp.sum(ds.T, axis=1, keepdims=True)
          dk = col_sums * _edge(relk_ref, n)
          _add_first_lane(drelk_ref, n, jnp.sum(col_sums * kc.astype(jnp.float32), axis=0, keepdims=True))
        return dk
      term = jax.lax.cond(n == n1, edge, full)
      if drelk_ref is not None:
        dk_cols[kb] = term if dk_cols[kb] is None else dk_cols[kb] + term
  if drelk_ref is None:
    return None
  return jnp.concatenate(dk_cols, axis=0) if len(dk_cols) > 1 else dk_cols[0]


def _add_first_lane(ref, n, g_1xD):
  """ref[n] += g in the row's first lane only."""
  ref[n, pl.ds(0, 1), :] += g_1xD


def _lanes(x_Nx128, width):
  """A per-row statistic kept in all 128 lanes, widened or cut to `width` lanes."""
  if width <= LANES:
    return x_Nx128[:, :width]
  return jnp.tile(x_Nx128, (1, width // LANES))


def _column(row_1xN):
  """(1, N) -> (N, 128), each row's value in all lanes."""
  return jnp.broadcast_to(row_1xN, (LANES, row_1xN.shape[1])).T


def _logits(q, k, kbias_1xK, tab_ref, rels, d, scale, b: Blocks, reach: int):
  s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
  if tab_ref is not None:
    s = s + _bias(tab_ref, d, b)
  if rels[0] is not None or rels[1] is not None:
    s = s + _distance_bias(q, k, *rels, d, b, reach)
  return jnp.where(kbias_1xK == 0.0, s, kbias_1xK)


def _tile_offset(i, j, b: Blocks):
  """(first key - first query) / 128 of query block i and key block j."""
  return j * (b.k // LANES) - i * (b.q // LANES)


@dataclasses.dataclass(frozen=True)
class Sides:
  """The distance terms of a call: vectors for a query term (q_i . rq[j - i]), for a key term
  (k_j . rk[j - i]), whether the two are the same vectors (one input, one gradient buffer), and `reach`:
  the rows of 128 offsets each side of 0 that hold anything but the terms' edge vectors (`distance_rows`)."""
  query: bool
  key: bool
  shared: bool = False
  reach: int = 1

  @property
  def arrays(self) -> int:
    return int(self.query) + int(self.key and not self.shared)

  @property
  def rows(self) -> int:  # offsets -128 (reach + 1) .. 128 (reach + 1) - 1
    return 2 * self.reach + 2


def _reach(rel: Sides | None) -> int:
  return rel.reach if rel else 0


def _pop_rels(refs, rel: Sides | None):
  """(query term's ref, key term's ref), either None, popped from the front of refs."""
  if rel is None:
    return None, None
  rq = refs.pop(0) if rel.query else None
  rk = (rq if rel.shared else refs.pop(0)) if rel.key else None
  return rq, rk


# --- kernels --------------------------------------------------------------------------------------------

def _forward_kernel(*refs, scale, b: Blocks, has_table, rel):
  q_ref, k_ref, v_ref, kb_ref, *refs = refs
  tab_ref = refs.pop(0) if has_table else None
  rels = _pop_rels(refs, rel)
  o_ref, m_out, l_out, m_ref, l_ref, acc_ref = refs
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  s = _logits(q_ref[...], k_ref[...], kb_ref[...], tab_ref, rels, _tile_offset(i, j, b), scale, b, _reach(rel))
  m_prev = m_ref[...]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  p = jnp.exp(s - _lanes(m_next, b.k))
  alpha = jnp.exp(m_prev - m_next)
  l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
  m_ref[...] = m_next
  v = v_ref[...]
  dh = v.shape[-1]
  acc_ref[...] = acc_ref[...] * _lanes(alpha, dh) + jax.lax.dot(
      p.astype(v.dtype), v, preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    l = l_ref[...]
    o_ref[...] = (acc_ref[...] / _lanes(l, dh)).astype(o_ref.dtype)
    # The maximum and the sum apart, not their logsumexp: in a row whose keys are all masked the maximum
    # is -0.7 * float32 max, which would absorb log(sum) and leave the backward pass unnormalised weights.
    m_out[...] = m_ref[...].T[:1, :]
    l_out[...] = l.T[:1, :]


def _probs_and_grad(q, k, v, do, kbias, m_ref, l_ref, di_ref, tab_ref, rels, d, scale, b: Blocks, reach: int):
  """Recomputes p_QxK from the forward pass's row maxima and sums and returns it with ds_QxK, the gradient
  of the logits (zero at masked keys)."""
  s = _logits(q, k, kbias, tab_ref, rels, d, scale, b, reach)
  p = jnp.exp(s - _lanes(_column(m_ref[...]), b.k)) * _lanes(1.0 / _column(l_ref[...]), b.k)
  dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
  ds = jnp.where(kbias == 0.0, p * (dp - _lanes(_column(di_ref[...]), b.k)), 0.0)
  return p, ds


def _dq_kernel(*refs, scale, b: Blocks, has_table, rel):
  q_ref, k_ref, v_ref, kb_ref, *refs = refs
  tab_ref = refs.pop(0) if has_table else None
  rels = _pop_rels(refs, rel)
  m_ref, l_ref, di_ref, do_ref, dq_ref, acc_ref = refs
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  k = k_ref[...]
  d = _tile_offset(i, j, b)
  _, ds = _probs_and_grad(q_ref[...], k, v_ref[...], do_ref[...], kb_ref[...], m_ref, l_ref, di_ref, tab_ref,
                          rels, d, scale, b, _reach(rel))
  acc_ref[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
  if rels[0] is not None:  # acc is scaled by `scale` at the end; the vectors carry their own scale
    acc_ref[...] += _distance_dq(ds, rels[0], d, b, rel.reach) / scale

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, scale, b: Blocks, has_table, rel):
  q_ref, k_ref, v_ref, kb_ref, *refs = refs
  tab_ref = refs.pop(0) if has_table else None
  rels = _pop_rels(refs, rel)
  m_ref, l_ref, di_ref, do_ref, dk_ref, dv_ref, *refs = refs
  dtab_ref = refs.pop(0) if has_table else None
  drels = _pop_rels(refs, rel)
  dk_acc, dv_acc = refs
  row, j, i = pl.program_id(1), pl.program_id(2), pl.program_id(3)  # grid (H, B, key blocks, query blocks)

  @pl.when(i == 0)
  def _():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  for ref in {id(r): r for r in (dtab_ref, *drels) if r is not None}.values():
    @pl.when((row == 0) & (i == 0) & (j == 0))
    def _(ref=ref):
      ref[...] = jnp.zeros(ref.shape, jnp.float32)

  q, k, do = q_ref[...], k_ref[...], do_ref[...]
  d = _tile_offset(i, j, b)
  p, ds = _probs_and_grad(q, k, v_ref[...], do, kb_ref[...], m_ref, l_ref, di_ref, tab_ref, rels, d, scale, b,
                          _reach(rel))
  dv_acc[...] += jax.lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
  dk_acc[...] += jax.lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
  if has_table:
    _add_diagonal_sums(dtab_ref, ds, d, b)
  if rel is not None:
    dk = _distance_dk_and_rows(ds, q, k, rels[1], *drels, d, b, rel.reach)
    if dk is not None:  # dk_acc is scaled by `scale` at the end; the vectors carry their own scale
      dk_acc[...] += dk / scale

  @pl.when(i == pl.num_programs(3) - 1)
  def _():
    dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# --- pallas_call wrappers -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  blocks: Blocks
  interpret: bool
  kernel: str = 'mosaic'  # or 'triton' (flash_gpu)
  rel: Sides | None = None  # the distance terms

  def gpu(self) -> flash_gpu.Static:
    return flash_gpu.Static(self.scale, self.blocks.length, flash_gpu.BLOCK, self.interpret)


def _grid_index(dkv: bool):
  """f(b, h, query block, key block) -> an index map over the grid: (B, H, query blocks, key blocks) for the
  forward and dq kernels, (H, B, key blocks, query blocks) for the dk/dv kernel."""
  def qk(f):
    return (lambda h, b_, o, n: f(b_, h, n, o)) if dkv else (lambda b_, h, o, n: f(b_, h, o, n))
  return qk


def _specs(b: Blocks, dh: int, nrows: int, has_table: bool, dkv: bool, rel: Sides | None = None):
  """BlockSpecs of q, k, v, key bias (and table, and distance rows) for the grid of `_grid_index`."""
  qk = _grid_index(dkv)
  specs = [pl.BlockSpec((_SQ, _SQ, b.q, dh), qk(lambda b_, h, i, j: (b_, h, i, 0))),
           pl.BlockSpec((_SQ, _SQ, b.k, dh), qk(lambda b_, h, i, j: (b_, h, j, 0))),
           pl.BlockSpec((_SQ, _SQ, b.k, dh), qk(lambda b_, h, i, j: (b_, h, j, 0))),
           pl.BlockSpec((_SQ, 1, b.k), qk(lambda b_, h, i, j: (b_, 0, j)))]
  if has_table:
    specs.append(pl.BlockSpec((_SQ, nrows, LANES), qk(lambda b_, h, i, j: (h, 0, 0))))
  for _ in range(rel.arrays if rel else 0):
    specs.append(pl.BlockSpec((rel.rows, LANES, dh), qk(lambda b_, h, i, j: (0, 0, 0))))
  row = pl.BlockSpec((_SQ, _SQ, 1, b.q), qk(lambda b_, h, i, j: (b_, h, 0, i)))
  q_rows = pl.BlockSpec((_SQ, _SQ, b.q, dh), qk(lambda b_, h, i, j: (b_, h, i, 0)))
  return specs, row, q_rows


def _distance_matmuls(st, kernel: str) -> float:
  """The distance terms' products per tile, in units of one tile's q.k product: two for the bias from q (two
  more from k), recomputed in each backward kernel; the dq kernel adds dq's two, the dk/dv kernel the
  rows' gradient from q (two) and, with the key term, dk's and the rows' gradient from k (four). Only the
  128 x 128 sub-tiles within the terms' reach (|key - query sub-tile| <= reach) do them; the rest take one
  product per row with an edge vector, not counted."""
  if not st.rel:
    return 0
  query, key = int(st.rel.query), int(st.rel.key)
  bias = 2 * (query + key)
  n = st.blocks.length // LANES
  within = sum(n - abs(t) for t in range(-st.rel.reach, st.rel.reach + 1) if abs(t) < n) / n ** 2
  return within * {'forward': bias, 'dq': bias + 2 * query, 'dkv': bias + 2 * query + 4 * key}[kernel]


def _cost(b: Blocks, shape, matmuls, itemsize, passes):
  bsz, h, lp, dh = shape
  tiles = bsz * h * lp * lp
  return pl.CostEstimate(flops=int(2 * matmuls * tiles * dh), transcendentals=tiles,
                         bytes_accessed=passes * bsz * h * lp * dh * itemsize * (lp // b.q + 2))


def _params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _forward(q, k, v, kbias, tab, rel, st: _Static):
  b, (bsz, h, lp, dh) = st.blocks, q.shape
  has_table = tab is not None
  specs, row, q_rows = _specs(b, dh, None if tab is None else tab.shape[1], has_table, False, st.rel)
  kernel = functools.partial(_forward_kernel, scale=st.scale, b=b, has_table=has_table, rel=st.rel)
  return pl.pallas_call(
      kernel, grid=(bsz, h, lp // b.q, lp // b.k), in_specs=specs, out_specs=[q_rows, row, row],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + [jax.ShapeDtypeStruct((bsz, h, 1, lp), jnp.float32)] * 2,
      scratch_shapes=[pltpu.VMEM((b.q, LANES), jnp.float32), pltpu.VMEM((b.q, LANES), jnp.float32),
                      pltpu.VMEM((b.q, dh), jnp.float32)],
      compiler_params=_params(('parallel', 'parallel', 'parallel', 'arbitrary')),
      cost_estimate=_cost(b, q.shape, 2 + _distance_matmuls(st, 'forward'), q.dtype.itemsize, 2),
      interpret=st.interpret,
  )(q, k, v, kbias, *([tab] if has_table else []), *rel)


def _backward(q, k, v, kbias, tab, rel, m, l, di, do, st: _Static):
  b, (bsz, h, lp, dh) = st.blocks, q.shape
  has_table = tab is not None
  args = (q, k, v, kbias, *([tab] if has_table else []), *rel, m, l, di, do)
  nrows = None if tab is None else tab.shape[1]

  specs, row, q_rows = _specs(b, dh, nrows, has_table, False, st.rel)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=st.scale, b=b, has_table=has_table, rel=st.rel),
      grid=(bsz, h, lp // b.q, lp // b.k), in_specs=[*specs, row, row, row, q_rows], out_specs=q_rows,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), scratch_shapes=[pltpu.VMEM((b.q, dh), jnp.float32)],
      compiler_params=_params(('parallel', 'parallel', 'parallel', 'arbitrary')),
      cost_estimate=_cost(b, q.shape, 3 + _distance_matmuls(st, 'dq'), q.dtype.itemsize, 3),
      interpret=st.interpret,
  )(*args)

  specs, row, q_rows = _specs(b, dh, nrows, has_table, True, st.rel)
  kv_rows = specs[1]
  out_specs = [kv_rows, kv_rows]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  if has_table:  # one buffer per head, resident while the head runs through every row's tiles
    out_specs.append(pl.BlockSpec((_SQ, nrows, LANES), lambda h_, b_, o, n: (h_, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((h, nrows, LANES), jnp.float32))
  for _ in rel:  # the distance rows' gradients, likewise per head
    out_specs.append(pl.BlockSpec((_SQ, st.rel.rows, LANES, dh), lambda h_, b_, o, n: (h_, 0, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((h, st.rel.rows, LANES, dh), jnp.float32))
  sums = has_table or bool(rel)
  outs = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=st.scale, b=b, has_table=has_table, rel=st.rel),
      grid=(h, bsz, lp // b.k, lp // b.q), in_specs=[*specs, row, row, row, q_rows], out_specs=out_specs,
      out_shape=out_shape, scratch_shapes=[pltpu.VMEM((b.k, dh), jnp.float32)] * 2,
      # The tables' gradients sum over every tile of every row of a head, so then only the heads run in
      # parallel; a buffer per head, not per (row, head), keeps them B times smaller.
      compiler_params=_params(('parallel', 'arbitrary' if sums else 'parallel', 'arbitrary', 'arbitrary')),
      cost_estimate=_cost(b, q.shape, 4 + _distance_matmuls(st, 'dkv'), q.dtype.itemsize, 4),
      interpret=st.interpret,
  )(*args)
  dk, dv, *outs = outs
  dtab = outs.pop(0) if has_table else None
  drel = tuple(jnp.sum(g, axis=0).astype(r.dtype) for g, r in zip(outs, rel))
  return dq, dk, dv, dtab, drel


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused(q, k, v, kbias, tab, rel, st: _Static):
  return _fused_fwd(q, k, v, kbias, tab, rel, st)[0]


def _flat(tab):  # the GPU kernel's table: [H, 2 Lp] over d = -Lp..Lp-1, the same values as the lane rows
  return None if tab is None else tab.reshape(tab.shape[0], -1)


def _fused_fwd(q, k, v, kbias, tab, rel, st):
  if st.kernel == 'triton':
    o, m, l = flash_gpu.forward(q, k, v, kbias, _flat(tab), st.gpu())
  else:
    o, m, l = _forward(q, k, v, kbias, tab, rel, st)
  return o, (q, k, v, kbias, tab, rel, o, m, l)


def _fused_bwd(st, res, do):
  q, k, v, kbias, tab, rel, o, m, l = res
  di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  drel = ()
  if st.kernel == 'triton':
    dq, dk, dv, dtab = flash_gpu.backward(q, k, v, kbias, _flat(tab), m, l, di, do, st.gpu())
    dtab = None if tab is None else dtab.reshape(tab.shape)
  else:
    dq, dk, dv, dtab, drel = _backward(q, k, v, kbias, tab, rel, m, l, di[:, :, None, :], do, st)
  return dq, dk, dv, None, dtab, drel


_fused.defvjp(_fused_fwd, _fused_bwd)


KERNELS = ('mosaic', 'triton')
SIDES = ('query', 'key', 'both')


@dataclasses.dataclass(frozen=True)
class Distances:
  """A score term from a table of vectors over offsets, times `scale`: with c = (R - 1) / 2, the vector of
  key-minus-query offset d = j - i is row clip(d, -c, c) + c of table_RxDh, or row clip(i - j, -c, c) + c
  with `by_query_offset` (offsets beyond +-c read the edge rows). `side` 'query' adds q_i . r, 'key'
  k_j . r, 'both' the two. relative_key is (its table, True, 'query'), relative_key_query the same on
  'both', Chang et al.'s convq (its taps, False, 'query') and convk (its taps, True, 'key')."""
  table_RxDh: Any
  by_query_offset: bool
  side: str
  scale: float

  def __post_init__(self):
    if self.side not in SIDES:
      raise ValueError(f'side {self.side!r} is not one of {SIDES}')
    shape = np.shape(self.table_RxDh)
    if len(shape) != 2 or shape[0] % 2 != 1:
      raise ValueError(f'a distance table has an odd number of rows (offsets -c..c) of Dh; got shape {shape}')


def reach(terms, b: Blocks) -> int:
  """Rows of 128 offsets each side of 0 that reach every term's last vector before its edge (offset c); one
  more row each side then holds edge vectors only (`Sides.rows`). At most n0 - 1: rows to -n0 and n0 - 1 hold
  every offset of the padded sequence, none is clamped, and the outer rows are never read."""
  c = max((t.table_RxDh.shape[0] - 1) // 2 for t in terms)
  return min(c // LANES + 1, b.n0 - 1)


def distance_rows(terms, side: str, reach_: int, dtype):
  """rel_Nx128xDh: the sum of the scaled vectors of the terms on `side` ('query' or 'key'; a 'both' term is
  on both) by key-minus-query offset d = j - i in rows of 128 (as `table_rows`), summed in float32 and cast
  to the compute dtype. Only offsets -128 (reach + 1) .. 128 (reach + 1) - 1: the kernel reads the first and
  last row (edge vectors only) for every offset beyond, so the rows, and their gradient, are O(c Dh) for a
  clipped term whatever L (O(L Dh) at most)."""
  d = np.arange(-LANES * (reach_ + 1), LANES * (reach_ + 1))
  out = None
  for t in terms:
    if t.side not in (side, 'both'):
      continue
    c = (t.table_RxDh.shape[0] - 1) // 2
    rows = jnp.asarray(t.table_RxDh, jnp.float32)[offsets.clipped_row(d, c, t.by_query_offset)] * t.scale
    out = rows if out is None else out + rows
  return out.astype(dtype).reshape(2 * reach_ + 2, LANES, -1)


def attention(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, table_HxR, mask_BxL, *, scale: float,
              interpret: bool = False, block_q: int | None = None, block_k: int | None = None,
              kernel: str = 'mosaic', distances=()):
  """ctx_BxLxHxDh = softmax(scale q.k + table[h, j - i] + distance terms, keys where mask_BxL is False
  masked) . v on this device's shard (see `sharded` for a mesh). `table_HxR` (d = j - i = -(L-1)..L-1) may
  be None; `distances` is a sequence of `Distances` (any number, on either side). `kernel`: 'mosaic' (TPU)
  or 'triton' (GPU, `flash_gpu`; its blocks are flash_gpu.BLOCK, block_q/block_k only pad; no distance
  terms)."""
  bsz, length, h, dh = q_BxLxHxDh.shape
  distances = tuple(distances or ())
  if kernel not in KERNELS:
    raise ValueError(f'kernel {kernel!r} is not one of {KERNELS}')
  if kernel == 'triton' and not flash_gpu.head_dim_supported(dh):
    raise ConfigError(f'the GPU kernel needs a head dimension that is a power of two >= 16; got {dh}')
  if kernel == 'triton' and distances:
    raise ConfigError(f'the GPU kernel has no terms over distance vectors ({", ".join(distance_terms())}; the '
                      'TPU kernel has)')
  b = blocks(length, block_q, block_k)
  pad = b.length - length

  def heads_first(x):
    return jnp.pad(jnp.transpose(x, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, pad), (0, 0)))

  kbias = jnp.where(mask_BxL, 0.0, MASKED).astype(jnp.float32)
  kbias = jnp.pad(kbias, ((0, 0), (0, pad)), constant_values=-jnp.inf)[:, None, :]
  tab = None if table_HxR is None else table_rows(table_HxR, length, b)
  rel, sides = (), None
  if distances:
    sides = Sides(query=any(t.side != 'key' for t in distances), key=any(t.side != 'query' for t in distances),
                  shared=all(t.side == 'both' for t in distances), reach=reach(distances, b))
    rel = tuple(distance_rows(distances, side, sides.reach, q_BxLxHxDh.dtype)
                for side, own in (('query', sides.query), ('key', sides.key and not sides.shared)) if own)
  o = _fused(heads_first(q_BxLxHxDh), heads_first(k_BxLxHxDh), heads_first(v_BxLxHxDh), kbias, tab, rel,
             _Static(float(scale), b, bool(interpret), kernel, sides))
  return jnp.transpose(o[:, :, :length], (0, 2, 1, 3))


# --- where the kernel runs ------------------------------------------------------------------------------

def distance_terms() -> list[str]:
  """The registered score terms over distance vectors (their modules return `Distances` when fused)."""
  return [n for n in registry.names() if registry.get(n).distances]


def unsupported(cfg, *, dropout: bool = True) -> list[str]:
  """Why the kernel cannot compute this model's attention (empty: it can); `dropout`: in a call that applies
  the model's attention dropout (a training step)."""
  plan = registry.parse(cfg.attention)
  out = []
  content = [c.name for c in plan.score if c.offsets is None and not c.distances]
  if content:
    out.append(f'the content-dependent score term(s) {", ".join(content)} (the kernel takes terms of the '
               'offset j - i: ' + ', '.join(n for n in registry.names() if registry.get(n).offsets) +
               '; and terms over distance vectors: ' + ', '.join(distance_terms()) + ')')
  if not cfg.option('use_qk', True):
    out.append('use_qk=False')
  if dropout and cfg.attention_dropout > 0.0:
    out.append(f'attention dropout (model.attention_dropout={cfg.attention_dropout}) on the probabilities, '
               'which the kernel never forms')
  return out


def target_platform() -> str:
  """The platform of the devices the computation is for: the current mesh's (a TPU topology compiled from a
  CPU host counts as 'tpu'), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


_LOGGED = set()


def kernel_for(platform: str) -> str:
  """The kernel a platform runs: the Triton form on a GPU, else the Mosaic one (on the CPU in interpret
  mode)."""
  return 'triton' if platform == 'gpu' else 'mosaic'


def choose(cfg, *, dropout: bool, record: bool) -> bool:
  """Whether this attention call runs the fused kernel, per `model.attention_impl` (logged once per case).

  'auto': on a TPU or a GPU, when the platform's kernel takes every score term, the head dimension suits that
  kernel and the call applies no dropout to the probabilities and records none (posjax.analysis asks for
  them); 'pallas': always but for recording calls (config validation has refused the rest); 'xla': never."""
  platform = target_platform()
  if cfg.attention_impl == 'pallas' and platform not in ('tpu', 'gpu', 'cpu'):
    raise ConfigError(f"model.attention_impl='pallas' has kernels for TPUs and GPUs (and their interpret mode "
                      f"on the CPU) but none for {platform}; use 'auto' or 'xla'")
  why = unsupported(cfg, dropout=dropout)
  over_distances = [c.name for c in registry.parse(cfg.attention).score if c.distances]
  if kernel_for(platform) == 'triton' and over_distances:
    if cfg.attention_impl == 'pallas':
      raise ConfigError(f"model.attention_impl='pallas': the GPU kernel has no terms over distance vectors "
                        f"({', '.join(over_distances)}; the TPU kernel has); use 'auto' or 'xla' for attention "
                        f"{cfg.attention!r}")
    why.append(f'the term(s) over distance vectors {", ".join(over_distances)} (in the TPU kernel only)')
  if kernel_for(platform) == 'triton' and not flash_gpu.head_dim_supported(cfg.head_dim):
    if cfg.attention_impl == 'pallas':
      raise ConfigError(f"model.attention_impl='pallas': the GPU kernel needs a head dimension that is a power "
                        f"of two >= 16; model.hidden_size / model.num_heads = {cfg.head_dim}")
    why.append(f'head dimension {cfg.head_dim} (the GPU kernel takes powers of two >= 16)')
  if record:
    why.append('the recording of the attention probabilities (posjax.analysis)')
  if cfg.attention_impl == 'xla':
    use, why = False, ["model.attention_impl='xla'"]
  elif cfg.attention_impl == 'pallas':
    use = not record
  else:
    use = platform in ('tpu', 'gpu') and not why
    if platform not in ('tpu', 'gpu'):
      why.insert(0, f'the {platform} backend')
  key = (cfg.attention, cfg.attention_impl, platform, use, tuple(why))
  if key not in _LOGGED:
    _LOGGED.add(key)
    if use:
      logging.info('attention %r: the fused Pallas kernel (%s) on %s%s', cfg.attention, kernel_for(platform),
                   platform, ' (interpret mode)' if platform == 'cpu' else '')
    else:
      logging.info('attention %r: XLA with a dense position bias, because of %s', cfg.attention,
                   '; '.join(why))
  return use


def sharded(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, table_HxR, mask_BxL, *, scale: float, interpret: bool,
            kernel: str = 'mosaic', distances=()):
  """`attention` under the current mesh: XLA does not partition a Mosaic or Triton kernel, so it runs in a
  shard_map over the mesh axes the logical axis rules give the batch and the heads (data, FSDP and tensor
  parallelism); the table's gradient is summed over the batch shards by shard_map's transpose."""
  fn = functools.partial(attention, scale=scale, interpret=interpret, kernel=kernel)
  distances = tuple(distances or ())
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, table_HxR, mask_BxL, distances=distances)
  def split(name, size):  # the mesh axes of a logical axis, or none where they do not divide it (an init
    axes = nn.logical_to_mesh_axes((name,))[0]  # traces one row under the trainer's mesh)
    n = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
    return axes if size % n == 0 else None
  batch, heads = split('batch', q_BxLxHxDh.shape[0]), split('heads', q_BxLxHxDh.shape[2])
  x = P(batch, None, heads, None)
  args, specs = (q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, mask_BxL), (x, x, x, P(batch, None))
  if table_HxR is not None:
    args, specs = args + (table_HxR,), specs + (P(heads, None),)
  # The distance tables serve every head: replicated, their gradients summed over all shards.
  args, specs = args + tuple(t.table_RxDh for t in distances), specs + (P(None, None),) * len(distances)

  def local(q, k, v, m, *tables):
    tables = list(tables)
    table = tables.pop(0) if table_HxR is not None else None
    dist = tuple(dataclasses.replace(t, table_RxDh=r) for t, r in zip(distances, tables))
    return fn(q, k, v, table, m, distances=dist)
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=x, check_vma=False)(*args)
