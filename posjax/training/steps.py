"""Train state, the pretraining objectives, and the jitted train / eval steps.

Objectives (`config.objective`): `mlm` (BERT), `mlm+nsp` (BERT's original recipe), `mlm+sop` (ALBERT),
`electra` (ELECTRA and ConvBERT's replaced-token detection). Each maps a batch to a scalar loss and a dict of
metrics; `loss` in the metrics is always the optimised total.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from posjax import layers
from posjax.config import ModelConfig
from posjax.errors import ConfigError
from posjax.models import Bert
from posjax.models.electra import ElectraPretrainer

OBJECTIVES = ('mlm', 'mlm+nsp', 'mlm+sop', 'electra')


NONFINITE_POLICIES = ('stop', 'skip')


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key; the key of a step = fold_in(rng, step)
  # Non-finite guard: updates whose loss or gradient norm is NaN/Inf are never applied.
  skipped: jax.Array  # how many updates were skipped
  first_bad_step: jax.Array  # the step of the first one (-1: none); under policy 'stop' nothing updates after


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


@dataclasses.dataclass(frozen=True)
class Objective:
  """A model and how to score it on a batch (ids, mask, type_ids, positions, labels, weights[,
  sentence_labels])."""
  name: str
  model: nn.Module
  generator_weight: float = 1.0
  discriminator_weight: float = 50.0

  def init(self, rng, seq_len: int, max_predictions: int):
    ids = jnp.zeros((1, seq_len), jnp.int32)
    mask = jnp.ones_like(ids, bool)
    pos = jnp.zeros((1, max_predictions), jnp.int32)
    params_rng, sample_rng = jax.random.split(rng)
    if self.name == 'electra':
      return self.model.init({'params': params_rng, 'sample': sample_rng}, ids, mask, ids, pos, pos,
                             pos.astype(jnp.float32))['params']
    return self.model.init({'params': params_rng}, ids, mask, ids, mlm_positions_BxP=pos)['params']

  @staticmethod
  def denominators(batch):
    """What the losses average over, counted on a whole batch: masked positions, real tokens, rows."""
    return {'masked': jnp.maximum(batch['weights'].sum(), 1.0),
            'tokens': jnp.maximum(batch['mask'].sum(), 1).astype(jnp.float32),
            'rows': jnp.asarray(batch['ids'].shape[0], jnp.float32)}

  def loss(self, params, batch, rng, deterministic: bool, denominators=None):
    """(loss, metrics). Every metric is a sum over the batch divided by a count from `denominators` (default:
    this batch's), so with a whole batch's counts the values of its micro-batches add up to the whole's."""
    d = denominators or self.denominators(batch)
    dropout_rng, sample_rng = jax.random.split(rng)
    rngs = {'dropout': dropout_rng, 'sample': sample_rng}
    type_ids = batch.get('type_ids', jnp.zeros_like(batch['ids']))
    if self.name == 'electra':
      out = self.model.apply({'params': params}, batch['ids'], batch['mask'], type_ids, batch['positions'],
                             batch['labels'], batch['weights'], deterministic=deterministic, rngs=rngs)
      gen_loss, gen_acc = mlm_loss(out['mlm_logits_BxPxV'], batch['labels'], batch['weights'], d['masked'])
      disc_loss, disc_acc = detection_loss(out['discriminator_logits_BxL'], out['replaced_BxL'],
                                           batch['mask'], d['tokens'])
      total = self.generator_weight * gen_loss + self.discriminator_weight * disc_loss
      return total, {'loss': total, 'mlm_loss': gen_loss, 'accuracy': gen_acc, 'discriminator_loss': disc_loss,
                     'discriminator_accuracy': disc_acc,
                     'replaced_fraction': out['replaced_BxL'].sum() / d['tokens']}
    out = self.model.apply({'params': params}, batch['ids'], batch['mask'], type_ids,
                           mlm_positions_BxP=batch['positions'], deterministic=deterministic, rngs=rngs,
                           only_predicted_rows=True)
    loss, acc = mlm_loss(out['mlm_logits_BxLxV'], batch['labels'], batch['weights'], d['masked'])
    metrics = {'mlm_loss': loss, 'accuracy': acc}
    if self.name in ('mlm+nsp', 'mlm+sop'):
      s_loss, s_acc = classification_loss(out['sentence_logits_Bx2'], batch['sentence_labels'], d['rows'])
      loss = loss + s_loss
      metrics.update(sentence_loss=s_loss, sentence_accuracy=s_acc)
    metrics['loss'] = loss
    return loss, metrics


def make_objective(config, model_config: ModelConfig, forbidden_ids: tuple[int, ...] = ()) -> Objective:
  """The objective `config.objective` names, with the model heads it needs."""
  name = config.objective
  if name not in OBJECTIVES:
    raise ConfigError(f'objective {name!r} is not one of {", ".join(OBJECTIVES)}')
  if name == 'electra':
    e = config.electra
    model = ElectraPretrainer(model_config, generator_fraction=e.generator_fraction,
                              temperature=e.temperature, forbidden_ids=tuple(forbidden_ids))
    return Objective(name, model, e.generator_weight, e.discriminator_weight)
  heads = dataclasses.replace(model_config, mlm_head=True, pooler=True, sentence_head=name != 'mlm',
                              discriminator_head=False)
  return Objective(name, Bert(heads))


def init_state(objective: Objective, tx: optax.GradientTransformation, seed: int, seq_len: int,
               max_predictions: int):
  """The initial TrainState with logical-axis boxes on params and optimizer state (unbox before use)."""
  params_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
  params = objective.init(params_rng, seq_len, max_predictions)
  return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng,
                    skipped=jnp.array(0, jnp.int32), first_bad_step=jnp.array(-1, jnp.int32))


def micro_batches(batch, k: int):
  """B rows -> k micro-batches of B/k (a leading axis of k). Micro-batch i takes rows i, i+k, ...: every
  device's contiguous block of rows then holds its share of each micro-batch, so splitting moves no data."""
  def split(x):
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, 'batch') + (None,) * (x.ndim - 2))
  return jax.tree_util.tree_map(split, batch)


def gradients(objective: Objective, params, batch, rng, grad_accum_steps: int = 1):
  """((loss, metrics), grads) of the whole batch, computed over `grad_accum_steps` micro-batches in a
  scan when > 1: the losses use the whole batch's denominators, so the sums equal the one-batch result."""
  grad_fn = jax.value_and_grad(
      lambda p, b, r, d: objective.loss(p, b, r, deterministic=False, denominators=d), has_aux=True)
  if grad_accum_steps == 1:
    return grad_fn(params, batch, rng, None)
  denominators = objective.denominators(batch)
  micro = micro_batches(batch, grad_accum_steps)

  def add(total, i_and_batch):
    i, b = i_and_batch
    out = grad_fn(params, b, jax.random.fold_in(rng, i), denominators)
    return jax.tree_util.tree_map(jnp.add, total, out), None

  first = jax.tree_util.tree_map(lambda x: x[0], micro)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(grad_fn, params, first, rng, denominators))
  total, _ = jax.lax.scan(add, zeros, (jnp.arange(grad_accum_steps), micro))
  return total


def train_step(state: TrainState, batch, *, objective: Objective, tx: optax.GradientTransformation,
               lr_schedule, nonfinite: str = 'stop', grad_accum_steps: int = 1):
  """One update. A non-finite loss or gradient norm is caught on the device, within its step: the update is
  not applied (`skipped` counts it). Under `nonfinite='stop'` the state then stays frozen at the last good
  update so the host can stop at its next look, naming `first_bad_step`; under 'skip' training goes on.

  Gradients are float32 (the parameters' dtype) whatever the compute dtype, and accumulate over
  `grad_accum_steps` micro-batches."""
  rng = jax.random.fold_in(state.rng, state.step)
  (loss, metrics), grads = gradients(objective, state.params, batch, rng, grad_accum_steps)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  apply = finite & ((state.first_bad_step < 0) if nonfinite == 'stop' else True)

  def update(params, opt_state):
    # The norm goes in as optax's `global_norm` extra argument (optimizer.clip_by_global_norm reuses it;
    # transformations that take no extra arguments never see it).
    updates, opt_state = optax.with_extra_args_support(tx).update(grads, opt_state, params,
                                                                  global_norm=grad_norm)
    return optax.apply_updates(params, updates), opt_state

  # A branch, not jnp.where(apply, new, old) over every leaf: the select split XLA's fused AdamW update into
  # more passes over memory (BERT-base update with optimizer.clip_by_global_norm, 2 CPU cores: 300 ms with
  # the select, 110 ms with the branch; 318 ms with optax's clip and the select, as before).
  params, opt_state = jax.lax.cond(apply, update, lambda p, o: (p, o), state.params, state.opt_state)
  metrics = {**metrics, 'grad_norm': grad_norm, 'learning_rate': lr_schedule(state.step),
             'nonfinite_loss': ~jnp.isfinite(loss), 'nonfinite_grad_norm': ~jnp.isfinite(grad_norm)}
  return state.replace(
      step=state.step + 1, params=params, opt_state=opt_state,
      skipped=state.skipped + (~finite).astype(jnp.int32),
      first_bad_step=jnp.where((state.first_bad_step < 0) & ~finite, state.step + 1, state.first_bad_step),
  ), metrics


def eval_step(params, batch, *, objective: Objective):
  # A fixed key: ELECTRA's generator samples, and eval numbers must be comparable across steps.
  return objective.loss(params, batch, jax.random.PRNGKey(0), deterministic=True)[1]
