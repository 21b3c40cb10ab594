"""Convolutions over the sequence inside self-attention, as in the authors' code of Chang et al. 2021
(mlpc-ucsd/BERT_Convolutions, `modeling_bert.py`, `BertSelfAttention`):

- `convqkv` (role projection): queries, keys and/or values computed by a convolution over the sequence of the
  layer's hidden states x (all D channels) in place of their linear projection, their
  `--qk` / `--value_forward "convolution[_depth][_mixed][_no_act] R G"`:
      q_i = sum_{t=-R..R} W_t x_{i+t} + b                    full or grouped convolution (G groups), or
      q_i = P act(sum_t w_t * x_{i+t} + b) + c               depthwise-separable ("depth"): a convolution of
                                                             each of the D channels, an optional activation,
                                                             then a pointwise linear map;
  for the first half of the heads only when mixed (the rest keep their linear projection; convolved heads
  first, as their concatenation). Parameters have their shapes: a depthwise (K, D) and its bias D, a
  pointwise D -> Hc*Dh; or a full kernel (K, D/G, Hc*Dh) and its bias. The hidden states are zeroed at
  padding before every projection of q, k and v whenever it is used (core.py), as theirs are.
- `convvalues` (role output): their `convolution` in `--attention_kernel`, a depthwise (per-channel)
  convolution of the projected values (bias included, padding zeroed) added to the attention output,
  ctx_i += s_h (sum_t w_t * v_{i+t} + b), with a per-head scale s_h fixed at 1 unless learned
  (`convolution_scaled`). Their width is tied to the composite window (2k+1); here it is its own option.

Initialisation is theirs: the convolutions keep PyTorch's Conv1d default, U(+-1/sqrt(fan_in)) for weights and
biases (fan_in = D/G*K, or K when depthwise); the pointwise maps are BERT's N(0, initializer_range) with zero
bias, as their `_init_weights` re-initialises every nn.Linear. The sequence ends are zero-padded, so a token's
output does not depend on how much padding follows or precedes its sequence.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from posjax import layers
from posjax.attention import registry
from posjax.config import ModelConfig
from posjax.errors import ConfigError


def depthwise_conv(x_BxLx, w_Kx):
  """y_i = sum_t w[t] * x_{i+t-K//2}, zero beyond the ends; w_Kx has x's trailing (channel) shape."""
  k, l = w_Kx.shape[0], x_BxLx.shape[1]
  pad = [(0, 0), (k // 2, k // 2)] + [(0, 0)] * (x_BxLx.ndim - 2)
  xp = jnp.pad(x_BxLx, pad)
  return sum(xp[:, t:t + l] * w_Kx[t] for t in range(k))


class SequenceConv(nn.Module):
  """One convolution over the sequence of x_BxLxD -> y_BxLxHcxDh (the `heads` convolved heads)."""
  config: ModelConfig
  kernel_size: int
  groups: int
  separable: bool
  activation: bool
  heads: int

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg, k, hc = self.config, self.kernel_size, self.heads
    b, l, d = x_BxLxD.shape
    dh = cfg.head_dim
    x_BxLxD = x_BxLxD.astype(cfg.dtype)
    if self.separable:
      # Their Conv1d(D, D, groups=D) keeps all D channels even when mixed; the pointwise map narrows them.
      w_KxD = self.param('depthwise', layers.torch_uniform(k, ('kernel', 'embed')), (k, d), cfg.param_dtype)
      b_D = self.param('depthwise_bias', layers.torch_uniform(k, ('embed',)), (d,), cfg.param_dtype)
      y = depthwise_conv(x_BxLxD, jnp.asarray(w_KxD, cfg.dtype)) + jnp.asarray(b_D, cfg.dtype)
      if self.activation:
        y = layers.activation(cfg.hidden_act)(y)
      return layers.dense((hc, dh), ('embed', 'heads', 'kv'), stddev=cfg.initializer_range, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, name='pointwise')(y)
    c = hc * dh
    dg = d // self.groups
    # Output channels grouped contiguously, as torch's Conv1d(groups=G): group g reads input channels
    # [g*D/G, (g+1)*D/G) and writes output channels [g*C/G, (g+1)*C/G).
    w = self.param('kernel', layers.torch_uniform(k * dg, ('kernel', None, 'heads', 'kv')), (k, dg, hc, dh),
                   cfg.param_dtype)
    b_HcxDh = self.param('bias', layers.torch_uniform(k * dg, ('heads', 'kv')), (hc, dh), cfg.param_dtype)
    y_BxLxC = jax.lax.conv_general_dilated(
        x_BxLxD, jnp.asarray(w, cfg.dtype).reshape(k, dg, c), window_strides=(1,),
        padding=[(k // 2, k // 2)], dimension_numbers=('NWC', 'WIO', 'NWC'), feature_group_count=self.groups)
    return y_BxLxC.reshape(b, l, hc, dh) + jnp.asarray(b_HcxDh, cfg.dtype)


_TARGETS = {'q': 'query', 'k': 'key', 'v': 'value'}


def convolved_heads(cfg: ModelConfig, heads: int) -> int:
  """Hc: how many of the `heads` dot-product heads `convqkv` computes (the first half when mixed)."""
  return heads // 2 if cfg.option('convqkv_mixed') else heads


def _check_convqkv(cfg: ModelConfig) -> None:
  heads = cfg.num_heads - sum(c.takes_heads(cfg) for c in registry.parse(cfg.attention).heads)
  hc = convolved_heads(cfg, heads)
  if hc < 1:
    raise ConfigError(f'attention option convqkv_mixed=True convolves half the heads, but there is only {heads} '
                      'dot-product head; set convqkv_mixed=False or use more heads')
  g, d, c = cfg.option('convqkv_groups'), cfg.hidden_size, hc * cfg.head_dim
  if not cfg.option('convqkv_separable') and (d % g or c % g):
    raise ConfigError(f'attention option convqkv_groups={g} must divide the model width {d} and the convolved '
                      f'width {c} ({hc} heads x head_dim {cfg.head_dim})')


class ConvQKV(nn.Module):
  """Convolutional queries/keys/values: p(x_BxLxD, heads) -> {target: y_BxLxHcxDh} for the convolved targets."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, heads):
    cfg = self.config
    kernel_size = cfg.option('convqkv_kernel_size')
    targets, groups = cfg.option('convqkv_targets'), cfg.option('convqkv_groups')
    hc = convolved_heads(cfg, heads)
    return {t: SequenceConv(cfg, kernel_size, groups, bool(cfg.option('convqkv_separable')),
                            bool(cfg.option('convqkv_activation')), hc, name=_TARGETS[t])(x_BxLxD)
            for t in targets}


class ConvValues(nn.Module):
  """o(v_BxLxHxDh, mask_BxL) -> s_h (depthwise_conv(v)_i + b), added to the attention output."""
  config: ModelConfig

  @nn.compact
  def __call__(self, v_BxLxHxDh, mask_BxL):
    cfg = self.config
    k = cfg.option('convvalues_kernel_size')
    _, _, h, dh = v_BxLxHxDh.shape
    # Per channel, as the authors' Conv1d(groups=hidden_size): each of the H*Dh value channels has a kernel.
    w_KxHxDh = self.param('kernel', layers.torch_uniform(k, ('kernel', 'heads', 'kv')), (k, h, dh),
                          cfg.param_dtype)
    b_HxDh = self.param('bias', layers.torch_uniform(k, ('heads', 'kv')), (h, dh), cfg.param_dtype)
    v_BxLxHxDh = layers.zero_padding(v_BxLxHxDh.astype(cfg.dtype), mask_BxL)
    y = depthwise_conv(v_BxLxHxDh, jnp.asarray(w_KxHxDh, cfg.dtype)) + jnp.asarray(b_HxDh, cfg.dtype)
    if cfg.option('convvalues_scale'):
      s_H = self.param('scale', layers.ones(('heads',)), (h,), cfg.param_dtype)
      y = y * jnp.asarray(s_H, cfg.dtype)[:, None]
    return y


registry.register(registry.Component(
    'convqkv', 'projection', ConvQKV, stackable=False,
    paper='Chang et al. 2021 (convolutional queries/keys/values of the hidden states)',
    params='T*(K+1)*D (separable) or T*(K/G-1)*D*Hc*Dh, beyond the linear projections they replace; '
           'T targets, Hc=H/2 if mixed',
    cost='O(T K L D) (separable) or O(T K L D Hc Dh / G)',
    options=(registry.integer('convqkv_kernel_size', 9, odd=True),  # width K of the convolution over the sequence
             # which of q, k, v are convolved
             registry.Option('convqkv_targets', 'qkv', 'some of q, k, v, each once (e.g. "qk", "v", "qkv")',
                             lambda v: isinstance(v, str) and bool(v) and len(set(v)) == len(v)
                             and not set(v) - set(_TARGETS)),
             registry.integer('convqkv_groups', 1),  # groups of the full convolution (ignored when separable)
             registry.flag('convqkv_separable', True),  # depthwise then pointwise (the authors' "depth")
             registry.flag('convqkv_activation', False),  # model.hidden_act between depthwise and pointwise
             registry.flag('convqkv_mixed', True)),  # convolve the first half of the heads only
    check=_check_convqkv))
registry.register(registry.Component(
    'convvalues', 'output', ConvValues, paper='Chang et al. 2021 (depthwise convolution of values)',
    params='(K+1)*H*Dh (+H if scaled)', cost='O(K L H Dh)',
    options=(registry.integer('convvalues_kernel_size', 9, odd=True),  # width K of the depthwise convolution
             registry.flag('convvalues_scale', False))))  # learn a per-head scale of the convolution (init 1)
