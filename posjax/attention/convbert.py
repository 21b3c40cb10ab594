"""`convbert`: ConvBERT's span-based dynamic convolution heads (Jiang et al. 2020), mixed with self-attention
heads, computed as transformers' `ConvBertSelfAttention` does:

    ks   = pointwise(depthwise_conv(x)) + b           # separable convolution of the input, BxLx(H_att*Dh)
    w_i  = softmax_K(W_f (ks_i * q_i) + b_f)           # one K-tap kernel per convolution head and position
    u    = x W_o + b_o                                 # the convolved values, BxLxHcxDh
    out_i = sum_{t=-K//2..K//2} w_i[t] * u_{i+t}       # span-based dynamic convolution

q is the dot-product heads' query (shared, as in the paper's mixed attention). The dot-product attention keeps
max(H // convbert_head_ratio, 1) heads and these convolution heads take the rest, all of width Dh = D / H; for
ratio 2 and an even head count that is exactly transformers' layout (attention and convolution each D / 2
wide). transformers' other layouts (H // ratio heads of width D / (2 H // ratio) in each branch) are the
posjax model with num_heads = 2 * max(H // ratio, 1) and ratio 2 (`posjax.convert.hf_convbert`).

transformers convolves padding like real tokens, so a token's output depends on the padding beside it. By
default padding is zeroed before both convolutions (then padding behaves like the zeros beyond the sequence
ends); `convbert_hf_padding=True` reproduces transformers exactly, for imported checkpoints.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from posjax import layers
from posjax.attention import registry
from posjax.attention.convolution import depthwise_conv
from posjax.config import ModelConfig
from posjax.errors import ConfigError


def conv_heads(cfg: ModelConfig) -> int:
  """How many of cfg.num_heads are convolution heads."""
  # transformers' special case: a ratio above the head count still leaves one attention head.
  return cfg.num_heads - max(cfg.num_heads // cfg.option('convbert_head_ratio'), 1)


def _check(cfg: ModelConfig) -> None:
  if conv_heads(cfg) < 1:
    raise ConfigError(f'convbert with convbert_head_ratio={cfg.option("convbert_head_ratio")} and '
                      f'model.num_heads={cfg.num_heads} leaves no convolution heads; use num_heads >= 2 and '
                      'convbert_head_ratio >= 2')


class SpanConvHeads(nn.Module):
  """h(x_BxLxD, q_BxLxHxDh, mask_BxL, deterministic) -> BxLxHcxDh."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, q_BxLxHxDh, mask_BxL, deterministic=True):
    del deterministic  # transformers applies no dropout in the convolution branch
    cfg = self.config
    k = cfg.option('convbert_kernel_size')
    hc, dh = conv_heads(cfg), cfg.head_dim
    _, _, h, _ = q_BxLxHxDh.shape
    hf_padding = bool(cfg.option('convbert_hf_padding'))
    dense = lambda feats, names, name, axis=-1: layers.dense(  # noqa: E731
        feats, names, stddev=cfg.initializer_range, axis=axis, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        name=name)

    x_BxLxD = x_BxLxD.astype(cfg.dtype)
    if not hf_padding:
      x_BxLxD = layers.zero_padding(x_BxLxD, mask_BxL)
    w_KxD = self.param('key_depthwise', layers.init(cfg.initializer_range, ('kernel', 'embed')),
                       (k, cfg.hidden_size), cfg.param_dtype)
    ks_BxLxHxDh = dense((h, dh), ('embed', 'heads', 'kv'), 'key_pointwise')(
        depthwise_conv(x_BxLxD, jnp.asarray(w_KxD, cfg.dtype)))
    logits_BxLxHcxK = dense((hc, k), (None, None, 'heads', 'kernel'), 'kernel', axis=(-2, -1))(
        ks_BxLxHxDh * q_BxLxHxDh.astype(cfg.dtype))
    w_BxLxHcxK = jax.nn.softmax(logits_BxLxHcxK.astype(jnp.float32), axis=-1).astype(cfg.dtype)

    u_BxLxHcxDh = dense((hc, dh), ('embed', 'heads', 'kv'), 'conv_out')(x_BxLxD)
    if not hf_padding:
      # x is zero there already, but the projection's bias is not.
      u_BxLxHcxDh = layers.zero_padding(u_BxLxHcxDh, mask_BxL)
    l = u_BxLxHcxDh.shape[1]
    up = jnp.pad(u_BxLxHcxDh, ((0, 0), (k // 2, k // 2), (0, 0), (0, 0)))
    # K shifted copies rather than an unfolded BxLxHcxDhxK tensor.
    return sum(up[:, t:t + l] * w_BxLxHcxK[..., t, None] for t in range(k))


registry.register(registry.Component(
    'convbert', 'heads', SpanConvHeads, stackable=False,
    paper='Jiang et al. 2020 (ConvBERT span-based dynamic convolution)',
    params='K*D + (D+1)*Ha*Dh + (Ha*Dh+1)*Hc*K - 2*(D+1)*Hc*Dh (Ha attention, Hc convolution heads)',
    cost='O(K L D); its Hc heads need no L^2 scores',
    # dot-product attention keeps max(H // ratio, 1) heads (ConvBERT uses 2)
    options=(registry.integer('convbert_head_ratio', 2),
             registry.integer('convbert_kernel_size', 9, odd=True),  # span width K
             registry.flag('convbert_hf_padding', False)),  # True: convolve padding like transformers does
    takes_heads=conv_heads, check=_check))
