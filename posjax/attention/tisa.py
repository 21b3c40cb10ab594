"""`tisa`: translation-invariant self-attention (Wennberg & Henter 2021, "The Case for Translation-Invariant
Self-Attention in Transformer-Based Language Models", ACL), meant to be used with no position embeddings:

    e_hij += f_h(i - j),   f_h(d) = sum_{s=1..S} a_hs exp(-|b_hs| (d - c_hs)^2)

S = `tisa_kernels` radial basis functions per head with amplitude a, sharpness b and offset c: 3*S*H
parameters per layer, stored (S, H) like the official code (github.com/ulmewennberg/tisa, model/tisa.py).
That code evaluates its Toeplitz matrix at d = i - j - 1 (its index shift), which is this f with every
offset c moved by one; here f is evaluated at i - j as the paper writes it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from posjax import layers
from posjax.attention import registry
from posjax.config import ModelConfig
from posjax.errors import ConfigError


def _normal(mean: float, stddev: float, names):
  def init(key, shape, dtype=jnp.float32):
    return mean + stddev * jax.random.normal(key, shape, dtype)
  return layers.logical(init, names)


# Initialisation of the official code's `Tisa._init_weights` (ulmewennberg/tisa, model/tisa.py): offsets
# N(0, 5^2) spread the bumps over about +-10 tokens; amplitudes and sharpnesses N(0.1, 0.01^2) make every
# kernel a small, broad (width ~ 1/sqrt(0.1) ~ 3 tokens) positive bump.
_INIT = {'offset': (0.0, 5.0), 'amplitude': (0.1, 0.01), 'sharpness': (0.1, 0.01)}


class Tisa(nn.Module):
  """Returns bias_1xHxLxL with bias[0, h, i, j] = f_h(i - j)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, q_BxLxHxDh, k_BxLxHxDh, mask_BxL, deterministic=True):
    del k_BxLxHxDh, mask_BxL, deterministic  # padded keys are masked by the core
    cfg = self.config
    s = cfg.option('tisa_kernels')
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
      raise ConfigError(f'tisa_kernels must be a positive integer (radial basis functions per head, 5 in the '
                        f'paper); got {s!r}')
    l, h = q_BxLxHxDh.shape[1], q_BxLxHxDh.shape[2]
    a_SxH, b_SxH, c_SxH = (
        jnp.asarray(self.param(name, _normal(*_INIT[name], ('kernel', 'heads')), (s, h), cfg.param_dtype),
                    jnp.float32)
        for name in ('amplitude', 'sharpness', 'offset'))
    # f only at the 2L-1 distances d = i - j = -(L-1)..L-1, then spread over LxL by a constant gather.
    d_R = jnp.arange(-(l - 1), l, dtype=jnp.float32)
    f_HxR = jnp.sum(a_SxH[..., None] * jnp.exp(-jnp.abs(b_SxH[..., None]) * (d_R - c_SxH[..., None]) ** 2),
                    axis=0)
    pos = np.arange(l)
    return f_HxR[:, pos[:, None] - pos[None, :] + l - 1][None].astype(cfg.dtype)


registry.register(registry.Component(
    'tisa', 'score', Tisa, paper='Wennberg & Henter 2021 (TISA)', params='3*S*H (S = tisa_kernels)',
    cost='O(S H L) + O(H L^2)', options=(('tisa_kernels', 5),)))
