"""Pretraining objectives (`config.objective`): `mlm` (BERT), `mlm+nsp` (BERT's original recipe), `mlm+sop`
(ALBERT), `electra` (ELECTRA and ConvBERT's replaced-token detection), each an `steps.Objective` over batches
of (ids, mask, type_ids, positions, labels, weights[, sentence_labels])."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from posjax import layers
from posjax.config import ModelConfig
from posjax.errors import ConfigError
from posjax.models import Bert
from posjax.models.electra import ElectraPretrainer

OBJECTIVES = ('mlm', 'mlm+nsp', 'mlm+sop', 'electra')


def mlm_loss(logits_BxPxV, labels_BxP, weights_BxP, n=None):
  """Mean cross-entropy and accuracy over the masked positions (float32 whatever the compute dtype).

  `n`: the denominator; default the number of masked positions here (a micro-batch passes its whole batch's,
  so the micro-batch losses sum to the whole batch's)."""
  logits = logits_BxPxV.astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, labels_BxP)
  n = jnp.maximum(weights_BxP.sum(), 1.0) if n is None else n
  loss = (xent * weights_BxP).sum() / n
  acc = ((layers.argmax_last(logits) == labels_BxP) * weights_BxP).sum() / n
  return loss, acc


def classification_loss(logits_BxC, labels_B, n=None):
  logits = logits_BxC.astype(jnp.float32)
  n = labels_B.shape[0] if n is None else n
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels_B).sum() / n
  return loss, (layers.argmax_last(logits) == labels_B).sum() / n


def detection_loss(logits_BxL, replaced_BxL, mask_BxL, n=None):
  """ELECTRA's discriminator loss: sigmoid cross-entropy over the real tokens."""
  logits, target, w = logits_BxL.astype(jnp.float32), replaced_BxL.astype(jnp.float32), mask_BxL.astype(
      jnp.float32)
  n = jnp.maximum(w.sum(), 1.0) if n is None else n
  loss = (optax.sigmoid_binary_cross_entropy(logits, target) * w).sum() / n
  acc = (((logits > 0) == replaced_BxL) * w).sum() / n
  return loss, acc


def denominators(batch):
  return {'masked': jnp.maximum(batch['weights'].sum(), 1.0),
          'tokens': jnp.maximum(batch['mask'].sum(), 1).astype(jnp.float32),
          'rows': jnp.asarray(batch['ids'].shape[0], jnp.float32)}


def _type_ids(batch):
  # Single-segment batches carry none.
  return batch['type_ids'] if 'type_ids' in batch else jnp.zeros_like(batch['ids'])


def _example(seq_len: int, max_predictions: int):
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return ids, jnp.ones_like(ids, bool), jnp.zeros((1, max_predictions), jnp.int32)


@dataclasses.dataclass(frozen=True)
class MaskedLM:
  """BERT's masked language modelling, plus the sentence head's loss (NSP or SOP) when `sentence`."""
  model: Bert
  seq_len: int
  max_predictions: int
  sentence: bool = False

  def init(self, rng):
    ids, mask, pos = _example(self.seq_len, self.max_predictions)
    return self.model.init({'params': jax.random.split(rng)[0]}, ids, mask, ids, mlm_positions_BxP=pos)['params']

  denominators = staticmethod(denominators)

  def loss(self, params, batch, rng, deterministic: bool, denominators=None):
    d = denominators or self.denominators(batch)
    dropout_rng, _ = jax.random.split(rng)
    out = self.model.apply({'params': params}, batch['ids'], batch['mask'], _type_ids(batch),
                           mlm_positions_BxP=batch['positions'], deterministic=deterministic,
                           rngs={'dropout': dropout_rng}, only_predicted_rows=True)
    loss, acc = mlm_loss(out['mlm_logits_BxLxV'], batch['labels'], batch['weights'], d['masked'])
    metrics = {'mlm_loss': loss, 'accuracy': acc}
    if self.sentence:
      s_loss, s_acc = classification_loss(out['sentence_logits_Bx2'], batch['sentence_labels'], d['rows'])
      loss = loss + s_loss
      metrics.update(sentence_loss=s_loss, sentence_accuracy=s_acc)
    metrics['loss'] = loss
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class Electra:
  """ELECTRA's generator MLM plus the discriminator's replaced-token detection, weighted."""
  model: ElectraPretrainer
  seq_len: int
  max_predictions: int
  generator_weight: float = 1.0
  discriminator_weight: float = 50.0

  def init(self, rng):
    ids, mask, pos = _example(self.seq_len, self.max_predictions)
    params_rng, sample_rng = jax.random.split(rng)
    return self.model.init({'params': params_rng, 'sample': sample_rng}, ids, mask, ids, pos, pos,
                           pos.astype(jnp.float32))['params']

  denominators = staticmethod(denominators)

  def loss(self, params, batch, rng, deterministic: bool, denominators=None):
    d = denominators or self.denominators(batch)
    dropout_rng, sample_rng = jax.random.split(rng)
    out = self.model.apply({'params': params}, batch['ids'], batch['mask'], _type_ids(batch),
                           batch['positions'], batch['labels'], batch['weights'], deterministic=deterministic,
                           rngs={'dropout': dropout_rng, 'sample': sample_rng})
    gen_loss, gen_acc = mlm_loss(out['mlm_logits_BxPxV'], batch['labels'], batch['weights'], d['masked'])
    disc_loss, disc_acc = detection_loss(out['discriminator_logits_BxL'], out['replaced_BxL'], batch['mask'],
                                         d['tokens'])
    total = self.generator_weight * gen_loss + self.discriminator_weight * disc_loss
    return total, {'loss': total, 'mlm_loss': gen_loss, 'accuracy': gen_acc, 'discriminator_loss': disc_loss,
                   'discriminator_accuracy': disc_acc, 'replaced_fraction': out['replaced_BxL'].sum() / d['tokens']}


def make(config, model_config: ModelConfig, seq_len: int, max_predictions: int,
         forbidden_ids: tuple[int, ...] = ()):
  """The objective `config.objective` names, with the model heads it needs."""
  name = config.objective
  if name not in OBJECTIVES:
    raise ConfigError(f'objective {name!r} is not one of {", ".join(OBJECTIVES)}')
  if name == 'electra':
    e = config.electra
    model = ElectraPretrainer(model_config, generator_fraction=e.generator_fraction, temperature=e.temperature,
                              forbidden_ids=tuple(forbidden_ids))
    return Electra(model, seq_len, max_predictions, e.generator_weight, e.discriminator_weight)
  heads = dataclasses.replace(model_config, mlm_head=True, pooler=True, sentence_head=name != 'mlm',
                              discriminator_head=False)
  return MaskedLM(Bert(heads), seq_len, max_predictions, sentence=name != 'mlm')
