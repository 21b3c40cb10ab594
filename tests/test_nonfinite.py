"""The non-finite guard inside the jitted train step: a NaN/Inf loss, or a finite loss with an Inf gradient,
is caught in its own step; 'skip' drops just that update, 'stop' freezes the state at the last good one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posjax.training import steps


@jax.custom_vjp
def scaled_square(w, g):
  return jnp.sum(w ** 2)


def _fwd(w, g):
  return scaled_square(w, g), (w, g)


def _bwd(res, ct):
  w, g = res
  return (ct * 2 * w * g, jnp.zeros_like(g))


scaled_square.defvjp(_fwd, _bwd)


class Quadratic:
  """loss = scale * |w|^2, whose gradient is further multiplied by `g` (so it can be Inf while the loss is not)."""

  def loss(self, params, batch, rng, deterministic, denominators=None):  # pylint: disable=unused-argument
    loss = batch['scale'] * scaled_square(params['w'], batch['g'])
    return loss, {'loss': loss}


def run(policy, bad_step, quantity, n=6):
  tx = optax.sgd(0.1)
  params = {'w': jnp.arange(1.0, 5.0)}
  state = steps.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                           rng=jax.random.PRNGKey(0), skipped=jnp.int32(0), first_bad_step=jnp.int32(-1))
  step = jax.jit(functools.partial(steps.train_step, objective=Quadratic(), tx=tx, lr_schedule=lambda s: 0.1,
                                   nonfinite=policy))
  history = []
  for i in range(1, n + 1):
    bad = i == bad_step
    batch = {'scale': jnp.float32(np.nan if bad and quantity == 'loss' else 1.0),
             'g': jnp.float32(np.inf if bad and quantity == 'grad_norm' else (0.0 if bad else 1.0))}
    state, m = step(state, batch)
    history.append(jax.device_get(m))
  return state, history


def reference(updates):
  """w after plain SGD steps, one per entry of `updates` (False: that step applies nothing)."""
  w = np.arange(1.0, 5.0, dtype=np.float32)
  for u in updates:
    if u:
      w = w - np.float32(0.1) * 2 * w
  return w


@pytest.mark.parametrize('quantity', ['loss', 'grad_norm'])
def test_skip_drops_only_the_bad_update_and_counts_it(quantity):
  state, history = run('skip', 3, quantity)
  np.testing.assert_allclose(state.params['w'], reference([1, 1, 0, 1, 1, 1]), rtol=1e-6)
  assert int(state.skipped) == 1 and int(state.first_bad_step) == 3 and int(state.step) == 6
  flags = [(bool(m['nonfinite_loss']), bool(m['nonfinite_grad_norm'])) for m in history]
  bad = (True, True) if quantity == 'loss' else (False, True)
  assert flags == [(False, False)] * 2 + [bad] + [(False, False)] * 3


@pytest.mark.parametrize('quantity', ['loss', 'grad_norm'])
def test_stop_freezes_the_state_at_the_last_good_update(quantity):
  state, history = run('stop', 3, quantity)
  np.testing.assert_allclose(state.params['w'], reference([1, 1]), rtol=1e-6)
  assert int(state.skipped) == 1 and int(state.first_bad_step) == 3
  assert bool(history[2][f'nonfinite_{quantity}'])


@pytest.mark.parametrize('policy', ['skip', 'stop'])
def test_a_skipped_update_leaves_params_and_adamw_state_bit_identical(policy):
  # AdamW with the trainer's clip: mu, nu and the step count must not move on a bad step (optax.sgd above has
  # no optimizer state to check).
  from posjax.training import optimizer
  tx = optax.chain(optimizer.clip_by_global_norm(1.0), optax.adamw(0.1, weight_decay=0.01))
  params = {'w': jnp.arange(1.0, 5.0)}
  state = steps.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                           rng=jax.random.PRNGKey(0), skipped=jnp.int32(0), first_bad_step=jnp.int32(-1))
  step = jax.jit(functools.partial(steps.train_step, objective=Quadratic(), tx=tx, lr_schedule=lambda s: 0.1,
                                   nonfinite=policy))
  good = {'scale': jnp.float32(1.0), 'g': jnp.float32(1.0)}
  state, _ = step(state, good)
  before = jax.device_get((state.params, state.opt_state))
  state, m = step(state, {'scale': jnp.float32(1.0), 'g': jnp.float32(np.inf)})
  assert bool(m['nonfinite_grad_norm']) and int(state.skipped) == 1
  after = jax.device_get((state.params, state.opt_state))
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
    np.testing.assert_array_equal(a, b)
  state, _ = step(state, good)  # 'skip' goes on from exactly the pre-bad state; 'stop' stays frozen
  moved = not np.array_equal(jax.device_get(state.params['w']), before[0]['w'])
  assert moved == (policy == 'skip')
