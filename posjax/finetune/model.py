"""A BERT-family encoder with a sequence classification (or regression, `num_labels` = 1) head, and its
objective for the trainer (`Classification`).

BERT and ALBERT classify the pooled [CLS] vector (pooler -> dropout -> linear, Devlin et al. 2019); models
without a pooler (ELECTRA, ConvBERT) use ELECTRA's head on the [CLS] hidden state (dropout -> dense -> GELU ->
dropout -> linear, Clark et al. 2020). Params: `bert` (the encoder's, as pretrained) and `classifier`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import optax

from posjax import layers
from posjax.config import ModelConfig
from posjax.models import Bert


def encoder_config(cfg: ModelConfig) -> ModelConfig:
  """The pretrained config without its pretraining heads (the pooler stays when the model has one)."""
  return dataclasses.replace(cfg, mlm_head=False, sentence_head=False, discriminator_head=False)


class Classifier(nn.Module):
  config: ModelConfig  # an `encoder_config`
  num_labels: int

  @nn.compact
  def __call__(self, ids_BxL, mask_BxL, type_ids_BxL, deterministic: bool = True):
    cfg = self.config
    # The head reads [CLS] alone, so the last layer's token-wise work runs on that row only.
    out = Bert(cfg, name='bert')(ids_BxL, mask_BxL, type_ids_BxL, deterministic=deterministic,
                                 only_predicted_rows=True)
    drop = lambda y: nn.Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)  # noqa: E731
    dense = lambda n, names, name: layers.dense(  # noqa: E731
        n, names, stddev=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    if cfg.pooler:
      x_BxD = drop(out['pooled_BxD'])
    else:
      x_BxD = drop(out['hidden_BxRxD'][:, 0])
      x_BxD = layers.activation('gelu')(dense(cfg.hidden_size, ('embed', 'embed_out'), 'dense')(x_BxD))
      x_BxD = drop(x_BxD)
    logits_BxC = dense(self.num_labels, ('embed_out' if not cfg.pooler else 'embed', 'classes'), 'out')(x_BxD)
    return logits_BxC.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Classification:
  """Cross-entropy over the classes, or squared error for regression (STS-B): a `steps.Objective` over
  batches of (ids, mask, type_ids, labels)."""
  model: Classifier
  seq_len: int
  regression: bool = False

  def init(self, rng):
    ids = jnp.zeros((1, self.seq_len), jnp.int32)
    return self.model.init({'params': rng}, ids, ids, ids)['params']

  @staticmethod
  def denominators(batch):
    return {'rows': jnp.asarray(batch['labels'].shape[0], jnp.float32)}

  def logits(self, params, batch, rng=None, deterministic: bool = True):
    return self.model.apply({'params': params}, batch['ids'], batch['mask'], batch['type_ids'],
                            deterministic=deterministic, rngs=None if rng is None else {'dropout': rng})

  def loss(self, params, batch, rng, deterministic: bool, denominators=None):
    rows = (denominators or self.denominators(batch))['rows']
    logits_BxC = self.logits(params, batch, rng, deterministic)
    if self.regression:
      loss = jnp.sum((logits_BxC[:, 0] - batch['labels']) ** 2) / rows
      return loss, {'loss': loss}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch['labels']).sum() / rows
    return loss, {'loss': loss, 'accuracy': (layers.argmax_last(logits_BxC) == batch['labels']).sum() / rows}
