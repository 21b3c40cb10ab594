"""The GPU form of `flash`'s kernel: the same fused attention with per-head offset tables, written for Pallas'
Triton backend (Pallas interpret mode on the CPU).

    ctx = softmax(scale q.k + table[h, j - i], padded keys masked) . v        float32 softmax statistics

It takes what `flash.attention` prepares (heads first, the length padded to its blocks, the key bias row of
0 / masked / -inf, the table over d = -Lp..Lp-1) and returns the same outputs and gradients; only the tiles'
access to the table differs. A GPU thread block reads global memory at any address, so a tile's bias is one
gather load of table[h, c - r + (first key - first query) + Lp] (the table row stays in L1/L2), with no
lane layout as on the TPU. The table's gradient, the sum of the logits' gradient over each diagonal, is
accumulated tile by tile: each tile's 2B-1 diagonal sums (read back from a per-program scratch block, B x B
floats) go by one atomic add into a BxHx(2Lp) float32 buffer, summed over the batch afterwards: O(B H L)
memory, no LxL tensor. Atomic float adds make the order of that sum, and so its last bits,
vary from run to run on a GPU (as XLA's own scatter-adds on GPU do unless XLA_FLAGS asks for deterministic
ops); its gradients for q, k and v are deterministic.

Grid: (query blocks, B, H) for the forward pass and dq, (key blocks, B, H) for dk, dv and the table; each
program loops over the other sequence axis (the layout of jax.experimental.pallas.ops.gpu.attention).
Head dimensions must be powers of two of at least 16 (Triton's dot); `flash.choose` says so.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK = 64  # query and key block: 64 x 64 float32 tiles fit a thread block's registers at head_dim 64


@dataclasses.dataclass(frozen=True)
class Static:
  scale: float
  length: int  # Lp, a multiple of `block`
  block: int
  interpret: bool
  num_warps: int = 4
  num_stages: int = 2


def head_dim_supported(dh: int) -> bool:
  return dh >= 16 and dh & (dh - 1) == 0


def _bias(tab_ref, first_q, first_k, st: Static):
  """bias_QxK = table[c - r + (first_k - first_q) + Lp] for the tile's rows r and columns c."""
  return plgpu.load(tab_ref.at[_table_index(first_q, first_k, st)])


def _table_index(first_q, first_k, st: Static):
  r = jax.lax.broadcasted_iota(jnp.int32, (st.block, st.block), 0)
  c = jax.lax.broadcasted_iota(jnp.int32, (st.block, st.block), 1)
  return c - r + (first_k - first_q + st.length)


def _logits(q, k, kbias_K, tab_ref, first_q, first_k, st: Static):
  s = plgpu.dot(q, k, trans_b=True) * st.scale
  if tab_ref is not None:
    s = s + _bias(tab_ref, first_q, first_k, st)
  return jnp.where(kbias_K[None, :] == 0.0, s, kbias_K[None, :])


def _forward_kernel(q_ref, k_ref, v_ref, kb_ref, *refs, st: Static, has_table: bool):
  tab_ref = refs[0] if has_table else None
  o_ref, m_ref, l_ref = refs[-3:]
  first_q = pl.program_id(0) * st.block
  q = q_ref[...]

  def body(j, carry):
    acc, m, l = carry
    keys = pl.ds(j * st.block, st.block)
    s = _logits(q, k_ref[keys, :], kb_ref[keys], tab_ref, first_q, j * st.block, st)
    # Key block 0 holds position 0, a real key (masked ones have a finite logit), so m is finite from the
    # first block on and exp(m - m_next) never meets -inf - -inf.
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_next[:, None])
    alpha = jnp.exp(m - m_next)
    v = v_ref[keys, :]
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_next, alpha * l + jnp.sum(p, axis=1)

  dh = q_ref.shape[-1]
  init = (jnp.zeros((st.block, dh), jnp.float32), jnp.full((st.block,), -jnp.inf, jnp.float32),
          jnp.zeros((st.block,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, st.length // st.block, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  m_ref[...] = m
  l_ref[...] = l


def _barrier(st: Static):
  if not st.interpret:  # interpret mode runs a program's threads as one: nothing to wait for (nor a rule)
    plgpu.debug_barrier()


def _add_diagonal_sums(dtab_ref, ds_ref, ds_QxK, base, st: Static):
  """dtab[base + c - r] += ds[r, c] over the tile. The tile goes through this program's own block of a
  scratch output, from which its 2B-1 diagonal sums are read row by row (row r holds diagonal c - r at
  column c); then one atomic add of those sums (2B-1 atomics per tile, not B^2), whose indices are distinct (an atomic add with repeated
  indices in one call would sum them on a GPU but not in interpret mode)."""
  _barrier(st)  # every thread has read the previous tile
  ds_ref[...] = ds_QxK
  _barrier(st)  # the whole tile is stored before any thread reads it
  # Lane u holds diagonal c - r = u - B; lane 0 (c - r = -B) meets no element and adds zero, within the
  # table: indices run base - B .. base + B - 1, inside 0 .. 2 Lp - 1 for every tile.
  u = jax.lax.broadcasted_iota(jnp.int32, (2 * st.block,), 0)

  def row(r, acc):
    c = u - st.block + r
    inside = (c >= 0) & (c < st.block)
    return acc + plgpu.load(ds_ref.at[r, jnp.clip(c, 0, st.block - 1)], mask=inside, other=0.0)
  sums = jax.lax.fori_loop(0, st.block, row, jnp.zeros((2 * st.block,), jnp.float32))
  plgpu.atomic_add(dtab_ref, base - st.block + u, sums)


def _probs_and_grad(q, k, v, do, kbias_K, m_Q, l_Q, di_Q, tab_ref, first_q, first_k, st: Static):
  s = _logits(q, k, kbias_K, tab_ref, first_q, first_k, st)
  p = jnp.exp(s - m_Q[:, None]) / l_Q[:, None]
  dp = plgpu.dot(do, v, trans_b=True)
  return p, jnp.where(kbias_K[None, :] == 0.0, p * (dp - di_Q[:, None]), 0.0)


def _dq_kernel(q_ref, k_ref, v_ref, kb_ref, *refs, st: Static, has_table: bool):
  tab_ref = refs[0] if has_table else None
  m_ref, l_ref, di_ref, do_ref, dq_ref = refs[-5:]
  first_q = pl.program_id(0) * st.block
  q, do, m, l, di = q_ref[...], do_ref[...], m_ref[...], l_ref[...], di_ref[...]

  def body(j, acc):
    keys = pl.ds(j * st.block, st.block)
    k = k_ref[keys, :]
    _, ds = _probs_and_grad(q, k, v_ref[keys, :], do, kb_ref[keys], m, l, di, tab_ref, first_q,
                            j * st.block, st)
    return acc + plgpu.dot(ds.astype(k.dtype), k)

  acc = jax.lax.fori_loop(0, st.length // st.block, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (acc * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, kb_ref, *refs, st: Static, has_table: bool):
  refs = list(refs)
  tab_ref = refs.pop(0) if has_table else None
  m_ref, l_ref, di_ref, do_ref, *refs = refs
  if has_table:
    refs.pop(0)  # the zeroed buffer aliased to dtab_ref
  dk_ref, dv_ref, *refs = refs
  dtab_ref, ds_ref = refs if has_table else (None, None)
  first_k = pl.program_id(0) * st.block
  keys = pl.ds(first_k, st.block)
  k, v, kbias = k_ref[keys, :], v_ref[keys, :], kb_ref[keys]

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(i * st.block, st.block)
    q, do = q_ref[rows, :], do_ref[rows, :]
    p, ds = _probs_and_grad(q, k, v, do, kbias, m_ref[rows], l_ref[rows], di_ref[rows], tab_ref,
                            i * st.block, first_k, st)
    if has_table:
      _add_diagonal_sums(dtab_ref, ds_ref, ds, first_k - i * st.block + st.length, st)
    return (dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True))

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, st.length // st.block, body, (zeros, zeros))
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(bsz, h, dh, st: Static, has_table: bool):
  """BlockSpecs for a grid (block, B, H): this program's block of rows, the whole sequence, the key bias
  row, the table row."""
  seq = pl.BlockSpec((None, None, st.length, dh), lambda n, b, h_: (b, h_, 0, 0))
  block = pl.BlockSpec((None, None, st.block, dh), lambda n, b, h_: (b, h_, n, 0))
  stat_seq = pl.BlockSpec((None, None, st.length), lambda n, b, h_: (b, h_, 0))
  stat_block = pl.BlockSpec((None, None, st.block), lambda n, b, h_: (b, h_, n))
  kbias = pl.BlockSpec((None, None, st.length), lambda n, b, h_: (b, 0, 0))
  table = [pl.BlockSpec((None, 2 * st.length), lambda n, b, h_: (h_, 0))] if has_table else []
  del bsz, h
  return seq, block, stat_seq, stat_block, kbias, table


def _call(kernel, grid, in_specs, out_specs, out_shape, st: Static, **kw):
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        compiler_params=plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages),
                        interpret=st.interpret, **kw)


def forward(q, k, v, kbias, tab, st: Static):
  """(o, m, l) for heads-first q, k, v [B, H, Lp, Dh], kbias [B, 1, Lp], tab [H, 2 Lp] or None."""
  bsz, h, lp, dh = q.shape
  has_table = tab is not None
  seq, block, _, stat_block, kb, table = _specs(bsz, h, dh, st, has_table)
  stat = jax.ShapeDtypeStruct((bsz, h, lp), jnp.float32)
  return _call(functools.partial(_forward_kernel, st=st, has_table=has_table), (lp // st.block, bsz, h),
               [block, seq, seq, kb, *table], [block, stat_block, stat_block],
               [jax.ShapeDtypeStruct(q.shape, q.dtype), stat, stat], st)(q, k, v, kbias, *([tab] if has_table else []))


def backward(q, k, v, kbias, tab, m, l, di, do, st: Static):
  """(dq, dk, dv, dtab [H, 2 Lp] or None)."""
  bsz, h, lp, dh = q.shape
  has_table = tab is not None
  seq, block, stat_seq, stat_block, kb, table = _specs(bsz, h, dh, st, has_table)
  grid = (lp // st.block, bsz, h)
  args = (q, k, v, kbias, *([tab] if has_table else []), m, l, di, do)
  dq = _call(functools.partial(_dq_kernel, st=st, has_table=has_table), grid,
             [block, seq, seq, kb, *table, stat_block, stat_block, stat_block, block], block,
             jax.ShapeDtypeStruct(q.shape, q.dtype), st)(*args)
  out_specs = [block, block]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  extra, aliases = (), {}
  if has_table:  # atomic adds need a zeroed buffer: one passed in and aliased to the output; then a
    # scratch block per program for the tile's gradient (O(B H L block) floats, discarded)
    out_specs += [pl.BlockSpec((None, None, 2 * lp), lambda n, b, h_: (b, h_, 0)),
                  pl.BlockSpec((None, None, None, st.block, st.block), lambda n, b, h_: (n, b, h_, 0, 0))]
    out_shape += [jax.ShapeDtypeStruct((bsz, h, 2 * lp), jnp.float32),
                  jax.ShapeDtypeStruct((lp // st.block, bsz, h, st.block, st.block), jnp.float32)]
    extra, aliases = (jnp.zeros((bsz, h, 2 * lp), jnp.float32),), {len(args): 2}
  outs = _call(functools.partial(_dkv_kernel, st=st, has_table=has_table), grid,
               [seq, block, block, kb, *table, stat_seq, stat_seq, stat_seq, seq,
                *([pl.BlockSpec((None, None, 2 * lp), lambda n, b, h_: (b, h_, 0))] if has_table else [])],
               out_specs, out_shape, st, input_output_aliases=aliases)(*args, *extra)
  return dq, outs[0], outs[1], (jnp.sum(outs[2], axis=0) if has_table else None)
