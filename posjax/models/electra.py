"""ELECTRA's replaced-token detection (Clark et al. 2020): a small MLM generator proposes tokens at the masked
positions, a discriminator learns which tokens were replaced; both share one embedding module.

ConvBERT (Jiang et al. 2020) is pretrained the same way with its own encoder.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from posjax.attention import registry
from posjax.config import ModelConfig
from posjax.errors import ConfigError
from posjax.models.bert import Bert, Embeddings


def discriminator_config(cfg: ModelConfig) -> ModelConfig:
  return dataclasses.replace(cfg, mlm_head=False, pooler=False, sentence_head=False, discriminator_head=True)


def generator_config(cfg: ModelConfig, fraction: float) -> ModelConfig:
  """The discriminator's config scaled by `fraction` in width, heads and feed-forward (ELECTRA's
  `generator_hidden_size`), with the same embedding width so the embeddings can be shared."""
  if not 0 < fraction <= 1:
    raise ConfigError(f'electra.generator_fraction must be in (0, 1]; got {fraction}')
  min_heads = 2 if registry.parse(cfg.attention).heads else 1
  heads = max(min_heads, round(cfg.num_heads * fraction))
  hidden = max(heads, int(cfg.hidden_size * fraction)) // heads * heads
  ffn_groups = cfg.ffn_groups
  intermediate = max(ffn_groups, int(cfg.intermediate_size * fraction)) // ffn_groups * ffn_groups
  if hidden % ffn_groups:
    ffn_groups = 1
  return dataclasses.replace(
      cfg, hidden_size=hidden, num_heads=heads, intermediate_size=intermediate, ffn_groups=ffn_groups,
      embedding_size=cfg.embed_dim if hidden != cfg.embed_dim else 0,
      mlm_head=True, mlm_head_act='gelu', pooler=False, sentence_head=False, discriminator_head=False)


class ElectraPretrainer(nn.Module):
  """Generator + discriminator with shared embeddings (params: `embeddings`, `generator`, `discriminator`).

  Call with the masked batch; returns the generator's MLM logits at `mlm_positions_BxP`, the discriminator's
  logits, and `replaced_BxL`, True where the discriminator input differs from the original token (a sampled
  token equal to the original counts as original, as in ELECTRA). Sampling uses the `sample` RNG stream and
  never proposes the [PAD]/[CLS]/[SEP] ids given in `forbidden_ids`.
  """
  config: ModelConfig  # the discriminator's
  generator_fraction: float = 0.25
  temperature: float = 1.0
  forbidden_ids: tuple[int, ...] = ()

  def setup(self):
    disc = discriminator_config(self.config)
    self.embeddings = Embeddings(disc)
    self.generator = Bert(generator_config(self.config, self.generator_fraction),
                          shared_embeddings=self.embeddings)
    self.discriminator = Bert(disc, shared_embeddings=self.embeddings)

  def __call__(self, ids_BxL, mask_BxL, type_ids_BxL, mlm_positions_BxP, labels_BxP, weights_BxP,
               deterministic: bool = True):
    gen = self.generator(ids_BxL, mask_BxL, type_ids_BxL, mlm_positions_BxP=mlm_positions_BxP,
                         deterministic=deterministic, only_predicted_rows=True)
    logits_BxPxV = gen['mlm_logits_BxLxV']
    sample_logits = jax.lax.stop_gradient(logits_BxPxV.astype(jnp.float32)) / self.temperature
    if self.forbidden_ids:
      sample_logits = sample_logits.at[..., jnp.array(self.forbidden_ids)].set(-jnp.inf)
    sampled_BxP = jax.random.categorical(self.make_rng('sample'), sample_logits).astype(ids_BxL.dtype)
    valid_BxP = weights_BxP > 0
    ids_BxL = jnp.asarray(ids_BxL)
    rows_Bx1 = jnp.arange(ids_BxL.shape[0])[:, None]
    # Unused prediction slots point at position 0 with weight 0: write there only where valid.
    cols_BxP = jnp.where(valid_BxP, mlm_positions_BxP, ids_BxL.shape[1])
    original_BxL = ids_BxL.at[rows_Bx1, cols_BxP].set(labels_BxP, mode='drop')
    disc_ids_BxL = ids_BxL.at[rows_Bx1, cols_BxP].set(sampled_BxP, mode='drop')
    disc = self.discriminator(disc_ids_BxL, mask_BxL, type_ids_BxL, deterministic=deterministic)
    return {'mlm_logits_BxPxV': logits_BxPxV,
            'discriminator_logits_BxL': disc['discriminator_logits_BxL'],
            'replaced_BxL': (disc_ids_BxL != original_BxL) & mask_BxL.astype(bool),
            'discriminator_ids_BxL': disc_ids_BxL}
