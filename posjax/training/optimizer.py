"""AdamW with linear warmup and linear decay, global-norm clipping, no decay on biases and LayerNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def warmup_linear_decay(learning_rate: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """0 -> learning_rate over warmup_steps (at least 1), then linearly to 0 at total_steps."""
  warmup = max(int(warmup_steps), 1)
  total = max(int(total_steps), warmup + 1)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup),
       optax.linear_schedule(learning_rate, 0.0, total - warmup)], [warmup])


def schedule(config) -> optax.Schedule:
  """Pretraining's schedule: `warmup_steps`, then decay to zero at `num_train_steps`."""
  return warmup_linear_decay(config.learning_rate, config.warmup_steps, config.num_train_steps)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm's result (to rounding) as g * min(1, max_norm / norm): one scalar division, then
  a multiply that XLA fuses into Adam's update. optax's per-element `g / norm` is a divide, which XLA will not
  duplicate into the several consumers of the clipped gradient, so it wrote the whole gradient out once more:
  the BERT-base (110M) clip + AdamW update alone took 196 ms with optax's clip against 86 ms with this one,
  on 2 CPU cores.

  `global_norm` (an optax extra argument, forwarded by optax.chain): the gradients' norm when the caller has it
  already; `steps.train_step` passes the one it checks for non-finite values, since inside its update branch
  XLA cannot share that reduction over every gradient (17 ms of a 110M-parameter update)."""

  def update(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if global_norm is None else global_norm
    scale = jnp.minimum(1.0, max_norm / norm)  # exactly 1 when not clipping
    return jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def _decay_mask(params):
  # BERT's recipe: weight decay on matrices only (not biases, LayerNorm, or 1-D tables).
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make(config, lr: optax.Schedule | None = None, scales=None) -> optax.GradientTransformation:
  """Clip, then AdamW with the config's hyperparameters (pretraining's and fine-tuning's configs share the
  field names). `lr`: the schedule (default: `schedule(config)`); `scales`: a tree like the parameters of
  multipliers of the update (fine-tuning's layer-wise decay)."""
  parts = [clip_by_global_norm(config.grad_clip_norm),
           optax.adamw(schedule(config) if lr is None else lr, b1=config.adam_b1, b2=config.adam_b2,
                       eps=config.adam_eps, weight_decay=config.weight_decay, mask=_decay_mask)]
  if scales is not None:
    parts.append(optax.stateless(lambda updates, params: jax.tree_util.tree_map(
        lambda u, s: u * s, updates, scales)))
  return optax.chain(*parts)
