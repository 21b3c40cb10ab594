"""`alibi`: attention with linear biases (Press et al. 2022), in the symmetric bidirectional form

    e_ij += -m_h * |i - j|

with no parameters. The slopes are the paper's: for H a power of two the geometric sequence
m_h = 2^(-8h/H), h = 1..H; otherwise those of the nearest smaller power of two, P, followed by every other
slope of 2P heads (the paper's reference code), so the slopes still interpolate the same range.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from posjax.attention import offsets, registry
from posjax.config import ModelConfig


def alibi_slopes(num_heads: int) -> np.ndarray:
  """The H slopes m_h, largest first, as float32."""
  def geometric(n):
    return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
  p = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = geometric(p) if p == num_heads else geometric(p) + geometric(2 * p)[0::2][:num_heads - p]
  return np.asarray(slopes, np.float32)


def alibi_offsets(cfg: ModelConfig, params, length: int, heads: int):
  """table_HxR[h, d + L - 1] = -m_h |d|, d = j - i (no parameters)."""
  del cfg, params
  return -jnp.asarray(alibi_slopes(heads))[:, None] * jnp.abs(jnp.asarray(offsets.distances(length), jnp.float32))


class ALiBi(nn.Module):
  """Returns the offset table_HxR of -m_h |d|."""
  config: ModelConfig

  @nn.compact
  def __call__(self, q_BxLxHxDh, k_BxLxHxDh, mask_BxL, deterministic=True):
    del k_BxLxHxDh, mask_BxL, deterministic
    return alibi_offsets(self.config, {}, q_BxLxHxDh.shape[1], q_BxLxHxDh.shape[2])


registry.register(registry.Component(
    'alibi', 'score', ALiBi, paper='Press et al. 2022 (ALiBi)', params='0', cost='O(H L^2)',
    offsets=alibi_offsets))
