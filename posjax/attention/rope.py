"""`rope`: rotary position embedding (Su et al. 2021), a transform of q and k before the dot product.

Each query and key at position p is rotated pairwise by angles p * theta_i, theta_i = base^(-2i/Dh),
i = 0..Dh/2-1, so that q_m . k_n = Re[sum_i q~_i conj(k~_i) e^{i (m-n) theta_i}] depends on m - n only.

Pairing convention: half-split, as in GPT-NeoX and Hugging Face's Llama (`rotate_half`): dimension i is paired
with dimension i + Dh/2, not with its neighbour 2i+1 as in the paper's and RoFormer's interleaved layout.
The two are the same mechanism up to a fixed permutation of the q/k projection columns.

Positions are the indices 0..L-1 of the sequence; with right padding they are the tokens' positions.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from posjax.attention import registry
from posjax.config import ModelConfig
from posjax.errors import ConfigError


def rotate(x_BxLxHxDh, base: float):
  """x * cos(p theta) + rotate_half(x) * sin(p theta), computed in float32 and cast back."""
  l, dh = x_BxLxHxDh.shape[1], x_BxLxHxDh.shape[3]
  inv_freq = 1.0 / (base ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  angles_LxDh2 = jnp.arange(l, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  angles_1xLx1xDh = jnp.concatenate([angles_LxDh2, angles_LxDh2], axis=-1)[None, :, None, :]
  x = x_BxLxHxDh.astype(jnp.float32)
  x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  y = x * jnp.cos(angles_1xLx1xDh) + rotated * jnp.sin(angles_1xLx1xDh)
  return y.astype(x_BxLxHxDh.dtype)


def _check(cfg: ModelConfig) -> None:
  if cfg.head_dim % 2:
    raise ConfigError(f'rope rotates pairs of dimensions: the head width model.hidden_size / num_heads must be '
                      f'even; got {cfg.head_dim}')


class RoPE(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, mask_BxL):
    del mask_BxL  # rotations depend on the index only; padded keys are masked by the core
    cfg = self.config
    base = cfg.option('rope_base')
    return rotate(q_BxLxHxDh, float(base)), rotate(k_BxLxHxDh, float(base)), v_BxLxHxDh


registry.register(registry.Component(
    'rope', 'qkv', RoPE, paper='Su et al. 2021 (RoFormer)', params='0', cost='O(B L H Dh)',
    options=(registry.number('rope_base', 10000.0, above=1),), check=_check))  # 10000 in Su et al.
