"""The train state and the jitted train / eval steps, for any objective.

An objective is anything with the three methods of `Objective`; the trainer knows nothing else of the task.
Pretraining's (posjax/training/objectives.py: MLM with NSP/SOP, ELECTRA) and fine-tuning's
(posjax/finetune/objective.py: classification and regression) are the ones posjax has.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

NONFINITE_POLICIES = ('stop', 'skip')


class Objective(Protocol):
  """A model and how to score it on a batch."""

  def init(self, rng) -> Any:
    """The model's parameters, with logical-axis boxes (`nn.LogicallyPartitioned`) on every leaf."""

  def denominators(self, batch) -> dict[str, jax.Array]:
    """What the losses average over (masked positions, tokens, rows), counted on a whole batch."""

  def loss(self, params, batch, rng, deterministic: bool, denominators=None) -> tuple[jax.Array, dict]:
    """(loss, metrics): every metric a sum over the batch divided by a count from `denominators` (default:
    this batch's), so with a whole batch's counts the values of its micro-batches add up to the whole's;
    `metrics['loss']` is the optimised total."""


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key; the key of a step = fold_in(rng, step)
  # Non-finite guard: updates whose loss or gradient norm is NaN/Inf are never applied.
  skipped: jax.Array  # how many updates were skipped
  first_bad_step: jax.Array  # the step of the first one (-1: none); under policy 'stop' nothing updates after


def init_params(objective: Objective, seed: int):
  """The objective's initial parameters (boxed) from `seed`."""
  return objective.init(jax.random.split(jax.random.PRNGKey(seed))[0])


def init_state(tx: optax.GradientTransformation, seed: int, params) -> TrainState:
  """The initial TrainState around `params` (boxed or not: the optimizer state takes their boxes)."""
  state_rng = jax.random.split(jax.random.PRNGKey(seed))[1]
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
