"""`t5`: T5's bucketed relative attention bias (Raffel et al. 2020), bidirectional (encoder) form.

    e_ij += b[bucket(j - i), h]

with one learned scalar per (bucket, head). Half the buckets hold keys after the query (j > i). Within each
half, distances below `t5_num_buckets // 4` get a bucket each, larger ones share logarithmically wider
buckets up to `t5_max_distance`, beyond which all share the last one. T5 adds the bias to unscaled q.k
logits; here it is added after the 1/sqrt(Dh) scaling, which for a learned bias is only a reparametrisation
(the table is the same tensor).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from posjax import layers
from posjax.attention import offsets, registry
from posjax.config import ModelConfig
from posjax.errors import ConfigError


def relative_position_bucket(relative_position, num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's bidirectional bucket of `relative_position` = key - query, in float32 like transformers' T5Attention
  so that distances on a bucket boundary fall on the same side."""
  half = num_buckets // 2
  rp = np.asarray(relative_position, np.int64)
  bucket = (rp > 0).astype(np.int64) * half
  rp = np.abs(rp)
  max_exact = half // 2
  # log(0) is never used (distances below max_exact take the exact branch); clamp to keep NumPy quiet.
  ratio = np.maximum(rp, 1).astype(np.float32) / np.float32(max_exact)
  large = max_exact + (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
                       * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return bucket + np.where(rp < max_exact, rp, large)


def t5_offsets(cfg: ModelConfig, params, length: int, heads: int):
  """table_HxR[h, d + L - 1] = b[bucket(d), h], d = j - i, from `relative_attention_bias` (num_buckets, H)."""
  del heads
  # The buckets of the 2L-1 offsets are a small constant (L is static).
  buckets_R = relative_position_bucket(offsets.distances(length), cfg.option('t5_num_buckets'),
                                       cfg.option('t5_max_distance'))
  return jnp.asarray(params['relative_attention_bias'], jnp.float32)[buckets_R].T


def _check(cfg: ModelConfig) -> None:
  nb, md = cfg.option('t5_num_buckets'), cfg.option('t5_max_distance')
  if md <= nb // 4:
    raise ConfigError(f'attention option t5_max_distance must be > t5_num_buckets // 4 = {nb // 4} (the exact '
                      f'buckets); got {md!r}')


class T5Bias(nn.Module):
  """Returns the offset table_HxR of the table `relative_attention_bias` of shape (num_buckets, H)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, q_BxLxHxDh, k_BxLxHxDh, mask_BxL, deterministic=True):
    del k_BxLxHxDh, mask_BxL, deterministic
    cfg = self.config
    nb = cfg.option('t5_num_buckets')
    l, h = q_BxLxHxDh.shape[1], q_BxLxHxDh.shape[2]
    table_NxH = self.param('relative_attention_bias', layers.init(cfg.initializer_range, ('pos', 'heads')),
                           (nb, h), cfg.param_dtype)
    return t5_offsets(cfg, {'relative_attention_bias': table_NxH}, l, h)


registry.register(registry.Component(
    't5', 'score', T5Bias, paper='Raffel et al. 2020 (T5)', params='N*H (N = t5_num_buckets)',
    cost='O(H L^2)', options=(registry.integer('t5_num_buckets', 32, minimum=4, even=True),  # half per direction
             registry.integer('t5_max_distance', 128, minimum=2)),
    check=_check, offsets=t5_offsets))
