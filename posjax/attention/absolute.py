"""Absolute position embeddings added to the token embeddings: learned (BERT), sinusoidal (Vaswani et al.
2017), or none at all (the relative, TISA and convolution papers' setting)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from posjax import layers
from posjax.attention import registry
from posjax.config import ModelConfig


class LearnedPositionEmbedding(nn.Module):
  """BERT's table P_LmaxxE; returns P[positions] as BxLxE (E: the embedding width)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, positions_BxL):
    cfg = self.config
    table = self.param('embedding', layers.init(cfg.initializer_range, ('pos', 'embed')),
                       (cfg.max_position_embeddings, cfg.embed_dim), cfg.param_dtype)
    return layers.lookup(table, positions_BxL, 'pos', cfg.dtype)


def sinusoid_table(length: int, dim: int) -> np.ndarray:
  """PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(...), as in Vaswani et al. 2017."""
  pos = np.arange(length, dtype=np.float64)[:, None]
  inv = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  table = np.zeros((length, dim), np.float64)
  table[:, 0::2] = np.sin(pos * inv)
  table[:, 1::2] = np.cos(pos * inv)[:, : dim // 2]
  return table.astype(np.float32)


class SinusoidalPositionEmbedding(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, positions_BxL):
    cfg = self.config
    table = jnp.asarray(sinusoid_table(cfg.max_position_embeddings, cfg.embed_dim), cfg.dtype)
    return table[positions_BxL]


registry.register(registry.Component(
    'absolute', 'position_embedding', LearnedPositionEmbedding, stackable=False,
    paper='Devlin et al. 2019 (BERT)', params='Lmax*D (once per model)', cost='-'))
registry.register(registry.Component(
    'sinusoidal', 'position_embedding', SinusoidalPositionEmbedding, stackable=False,
    paper='Vaswani et al. 2017', params='0', cost='-'))
registry.register(registry.Component(
    'none', 'position_embedding', lambda cfg, name=None: None, stackable=False,
    paper='no absolute positions (Chang et al. 2021; Wennberg & Henter 2021)', params='0', cost='-'))
