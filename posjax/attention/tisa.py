"""`tisa`: translation-invariant self-attention (Wennberg & Henter 2021, "The Case for Translation-Invariant
Self-Attention in Transformer-Based Language Models", ACL), meant to be used with no position embeddings:

    e_hij += f_h(i - j),   f_h(d) = sum_{s=1..S} a_hs exp(-|b_hs| (d - c_hs)^2)

S = `tisa_kernels` radial basis functions per head with amplitude a, sharpness b and offset c: 3*S*H
parameters per layer, stored (S, H) like the official code (github.com/ulmewennberg/tisa, model/tisa.py).
That code evaluates its Toeplitz matrix at d = i - j - 1 (its index shift), which is this f with every
offset c moved by one; here f is evaluated at i - j as the paper writes it. As an offset table (over the key
minus query offsets d = j - i, see `offsets`) the term is f_h(-d).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from posjax import layers
from posjax.attention import offsets, registry
from posjax.config import ModelConfig


def _normal(mean: float, stddev: float, names):
  def init(key, shape, dtype=jnp.float32):
    return mean + stddev * jax.random.normal(key, shape, dtype)
  return layers.logical(init, names)


# Initialisation of the official code's `Tisa._init_weights` (ulmewennberg/tisa, model/tisa.py): offsets
# N(0, 5^2) spread the bumps over about +-10 tokens; amplitudes and sharpnesses N(0.1, 0.01^2) make every
# kernel a small, broad (width ~ 1/sqrt(0.1) ~ 3 tokens) positive bump.
_INIT = {'offset': (0.0, 5.0), 'amplitude': (0.1, 0.01), 'sharpness': (0.1, 0.01)}


def tisa_offsets(cfg: ModelConfig, params, length: int, heads: int):
  """table_HxR[h, d + L - 1] = f_h(i - j) = f_h(-d), d = j - i, from the (S, H) parameters."""
  del cfg, heads
  a_SxH, b_SxH, c_SxH = (jnp.asarray(params[n], jnp.float32)[..., None]
                         for n in ('amplitude', 'sharpness', 'offset'))
  x_R = -jnp.asarray(offsets.distances(length), jnp.float32)  # i - j
  return jnp.sum(a_SxH * jnp.exp(-jnp.abs(b_SxH) * (x_R - c_SxH) ** 2), axis=0)


class Tisa(nn.Module):
  """Returns the offset table_HxR of f_h(i - j) (see `tisa_offsets`)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, q_BxLxHxDh, k_BxLxHxDh, mask_BxL, deterministic=True):
    del k_BxLxHxDh, mask_BxL, deterministic  # padded keys are masked by the core
    cfg = self.config
    s = cfg.option('tisa_kernels')
    l, h = q_BxLxHxDh.shape[1], q_BxLxHxDh.shape[2]
    params = {name: self.param(name, _normal(*_INIT[name], ('kernel', 'heads')), (s, h), cfg.param_dtype)
              for name in ('amplitude', 'sharpness', 'offset')}
    return tisa_offsets(cfg, params, l, h)


registry.register(registry.Component(
    'tisa', 'score', Tisa, paper='Wennberg & Henter 2021 (TISA)', params='3*S*H (S = tisa_kernels)',
    cost='O(S H L) + O(H L^2)', offsets=tisa_offsets,
    options=(registry.integer('tisa_kernels', 5),)))  # radial basis functions per head (5 in the paper)
