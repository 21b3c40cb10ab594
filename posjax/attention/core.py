"""The one multi-head attention computation every variant plugs into.

    q, k, v = proj(x)                         # q_BxLxHxDh ...; a projection component (convolutional q/k/v)
                                               # computes the first heads of some of them from x instead
    q, k, v = qkv transforms(q, k, v)         # RoPE
    logits  = q.k / sqrt(Dh) + sum score terms   # att_BxHxLxL (terms: relative, T5, TISA, ALiBi, convq ...)
    ctx     = softmax(logits, masked) . v      # float32 softmax
    ctx     = concat(ctx, extra heads(x, q))   # ConvBERT's span-based convolution heads
    ctx     = ctx + output terms(v)            # Chang et al.'s depthwise convolution of values
    y       = out_proj(ctx)

Module interfaces of the pluggable pieces (`mask_BxL` is True at real tokens):
- projection: p(x_BxLxD, heads) -> {'q'|'k'|'v': y_BxLxHcxDh}, the first Hc of the `heads` dot-product heads
          of those targets, from x zeroed at padding (the linear projections see the same x);
- score:  term(q_BxLxHxDh, k_BxLxHxDh, mask_BxL, deterministic) -> logits_[B|1]xHxLxL, added after scaling;
          a content-free term (its component has `offsets`) returns its table_HxR over offsets j - i instead:
          the tables are summed, then spread over the logits (XLA) or computed per tile by the fused kernel
          (`flash`, chosen by `model.attention_impl`);
- qkv:    t(q, k, v, mask_BxL) -> (q, k, v);
- heads:  h(x_BxLxD, q_BxLxHxDh, mask_BxL, deterministic) -> ctx_BxLxH'xDh;
- output: o(v_BxLxHxDh, mask_BxL) -> BxLxHxDh added to the attention context.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from posjax import layers
from posjax.attention import flash, offsets, registry
from posjax.config import ModelConfig


def masked_softmax_attention(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, bias, mask_BxL, *, scale, use_qk=True,
                             dropout=None):
  """softmax(scale*q.k + bias, keys masked) . v, softmax in float32.

  `bias` is None or broadcastable to BxHxLxL. `dropout` is None or a function applied to the probabilities.
  """
  if use_qk:
    logits = jnp.einsum('bqhd,bkhd->bhqk', q_BxLxHxDh, k_BxLxHxDh).astype(jnp.float32) * scale
  else:
    b, l, h, _ = q_BxLxHxDh.shape
    logits = jnp.zeros((b, h, l, k_BxLxHxDh.shape[1]), jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  big_neg = jnp.finfo(jnp.float32).min
  logits = jnp.where(mask_BxL[:, None, None, :], logits, big_neg)
  probs_BxHxLxL = jax.nn.softmax(logits, axis=-1).astype(v_BxLxHxDh.dtype)
  if dropout is not None:
    probs_BxHxLxL = dropout(probs_BxHxLxL)
  return jnp.einsum('bhqk,bkhd->bqhd', probs_BxHxLxL, v_BxLxHxDh)


class MultiHeadAttention(nn.Module):
  """Self-attention with the variant's pieces; returns y_BxLxD (before residual and LayerNorm)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_BxL, deterministic: bool = True, rows_BxR=None):
    """`rows_BxR`: if given, only those query rows go through the output projection (y is BxRxD); keys,
    values and every score term still see the whole sequence."""
    cfg = self.config
    plan = registry.parse(cfg.attention)
    dh = cfg.head_dim
    # Parallel branches (ConvBERT's convolution heads) take some heads; dot-product attention keeps the rest.
    h = cfg.num_heads - sum(c.takes_heads(cfg) for c in plan.heads)  # >= 1: checked with the config
    # With a projection component the hidden states are zeroed at padding before every projection, as in the
    # authors' code, so that its convolutions see zeros there.
    xp_BxLxD = x_BxLxD
    first = {}
    if plan.projection is not None:
      xp_BxLxD = layers.zero_padding(x_BxLxD, mask_BxL)
      first = plan.projection.build(cfg, name=plan.projection.name)(xp_BxLxD, h)

    def project(target, name):
      """The target's h heads: the projection component's first ones (if any), then the linear rest."""
      y_BxLxHcxDh = first.get(target)
      rest = h - (0 if y_BxLxHcxDh is None else y_BxLxHcxDh.shape[2])
      if not rest:
        return y_BxLxHcxDh
      y_BxLxHxDh = layers.dense((rest, dh), ('embed', 'heads', 'kv'), stddev=cfg.initializer_range,
                                dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)(xp_BxLxD)
      if y_BxLxHcxDh is None:
        return y_BxLxHxDh
      return jnp.concatenate([y_BxLxHcxDh.astype(y_BxLxHxDh.dtype), y_BxLxHxDh], axis=2)

    q_BxLxHxDh = project('q', 'query')
    k_BxLxHxDh = project('k', 'key')
    v_BxLxHxDh = project('v', 'value')

    for c in plan.qkv:
      q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh = c.build(cfg, name=c.name)(
          q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, mask_BxL)

    use_qk = cfg.option('use_qk')
    scale = 1.0 / float(dh) ** 0.5
    need_dropout = cfg.attention_dropout > 0.0 and not deterministic
    # posjax.analysis asks for the probabilities by making `intermediates` mutable; no fused kernel forms
    # them, so that (analysis-only) call takes the explicit path.
    record = self.is_mutable_collection('intermediates')
    fused = flash.choose(cfg, dropout=need_dropout, record=record)

    table_HxR, bias, distances = None, None, []
    for c in plan.score:
      if fused and c.distances:  # the kernel forms x . r itself, from the term's vectors over distances
        distances.append(c.build(cfg, name=c.name, fused=True)(q_BxLxHxDh, k_BxLxHxDh, mask_BxL, deterministic))
        continue
      term = c.build(cfg, name=c.name)(q_BxLxHxDh, k_BxLxHxDh, mask_BxL, deterministic)
      if c.offsets is not None:
        table_HxR = term if table_HxR is None else table_HxR + term
      else:
        bias = term if bias is None else bias + term
    if table_HxR is not None and not fused:
      spread = offsets.spread(table_HxR, x_BxLxD.shape[1]).astype(cfg.dtype)
      bias = spread if bias is None else bias + spread
    if bias is not None:
      # One rule for both unfused paths: the summed score terms in the compute dtype, added to the float32
      # logits (bfloat16 training keeps a bfloat16 BxHxLxL bias for the backward pass, not a float32 one).
      bias = bias.astype(cfg.dtype)
      if bias.shape[0] == 1 and x_BxLxD.shape[0] > 1:
        bias = layers.broadcast_batch(bias, x_BxLxD.shape[0])
    if fused:
      platform = flash.target_platform()
      ctx_BxLxHxDh = flash.sharded(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, table_HxR, mask_BxL, scale=scale,
                                   interpret=platform == 'cpu', kernel=flash.kernel_for(platform),
                                   distances=distances)
    elif use_qk and not need_dropout and not record:
      # XLA's (or cuDNN's / a TPU) fused kernel; HF-style key masking via `mask`.
      ctx_BxLxHxDh = jax.nn.dot_product_attention(
          q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh,
          bias=bias,
          mask=mask_BxL[:, None, None, :], scale=scale)
    else:
      drop = nn.Dropout(cfg.attention_dropout)

      def on_probs(p_BxHxLxL):
        if record:
          self.sow('intermediates', 'probs_BxHxLxL', p_BxHxLxL)
        return drop(p_BxHxLxL, deterministic=False) if need_dropout else p_BxHxLxL

      ctx_BxLxHxDh = masked_softmax_attention(
          q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, bias, mask_BxL, scale=scale, use_qk=use_qk,
          dropout=on_probs if (need_dropout or record) else None)

    for c in plan.output:
      ctx_BxLxHxDh = ctx_BxLxHxDh + c.build(cfg, name=c.name)(v_BxLxHxDh, mask_BxL)
    for c in plan.heads:
      extra = c.build(cfg, name=c.name)(x_BxLxD, q_BxLxHxDh, mask_BxL, deterministic)
      ctx_BxLxHxDh = jnp.concatenate([ctx_BxLxHxDh, extra], axis=2)

    if rows_BxR is not None:
      ctx_BxLxHxDh = layers.take_rows(ctx_BxLxHxDh, rows_BxR)
    return layers.dense(cfg.hidden_size, ('heads', 'kv', 'embed'), axis=(-2, -1),
                        stddev=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        name='out')(ctx_BxLxHxDh)
