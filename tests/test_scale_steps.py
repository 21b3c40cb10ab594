"""Gradient accumulation equals one big batch; bfloat16 compute keeps float32 weights and statistics."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax

from helpers import init_state, micro_config, mlm_objective
from posjax.data import pipeline, pretrain
from posjax.training import optimizer, steps


def _setup(**overrides):
  c = micro_config(**{'data.seq_len': 16, **overrides})
  objective = mlm_objective(c)
  tx = optimizer.make(c)
  return c, objective, tx, init_state(objective, tx)


def _batch(rows=16, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, 100, size=(rows, 16)).astype(np.int32)
  ids[:, 0] = 2
  for r in range(rows):  # ragged lengths: micro-batches then hold different numbers of masked tokens
    ids[r, 6 + (r * 5) % 10:] = 0
  return pipeline.MLMBatches({'ids': ids}, rows, pretrain.Specials(0, 2, 3, 4, 1), 100, seed=0,
                             max_predictions=4).batch(0)


def test_four_micro_batches_equal_one_big_batch():
  c, objective, _, state = _setup(**{'model.num_layers': 1})
  # Plain SGD: the update is the gradient itself (Adam's first step would hide its scale), and no warmup.
  tx = optax.sgd(1.0)
  state = state.replace(opt_state=tx.init(state.params))
  batch = _batch()
  counts = batch['weights'].reshape(4, 4, -1).swapaxes(0, 1).sum(axis=(1, 2))
  assert len(set(counts.tolist())) > 1, counts  # unequal: an average of micro-batch means would be wrong
  out = {}
  for k in (1, 4):
    step = jax.jit(lambda s, b, k=k: steps.train_step(s, b, objective=objective, tx=tx,
                                                      lr_schedule=optimizer.schedule(c), grad_accum_steps=k))
    out[k] = step(state, batch)
  (s1, m1), (s4, m4) = out[1], out[4]
  for name in ('loss', 'accuracy', 'grad_norm'):
    np.testing.assert_allclose(m4[name], m1[name], rtol=1e-5, err_msg=name)
  diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                                           s4.params, s1.params))
  moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                                           s1.params, state.params))
  print(f'grad accumulation x4 vs one batch: loss diff {abs(float(m4["loss"] - m1["loss"])):.2e}, '
        f'max param diff {max(diffs):.2e} (update size up to {max(moved):.2e})')
  assert max(moved) > 1e-4 and max(diffs) < 1e-6


def _primitives(jaxpr, name):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _primitives(sub, name)


def test_bfloat16_compute_keeps_float32_weights_softmax_and_layernorm_statistics():
  c, objective, tx, state = _setup(**{'model.dtype': 'bfloat16'})
  batch = _batch(seed=1)
  step = jax.jit(lambda s, b: steps.train_step(s, b, objective=objective, tx=tx,
                                               lr_schedule=optimizer.schedule(c)))
  losses = []
  for _ in range(4):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert {x.dtype for x in jax.tree_util.tree_leaves((state.params, state.opt_state)) if x.ndim} == {
      jnp.dtype(jnp.float32)}
  # The same weights in float32 give nearly the same loss (an independent check of the bf16 path).
  f32 = dataclasses.replace(objective, model=type(objective.model)(
      dataclasses.replace(objective.model.config, dtype=jnp.float32)))
  key = jax.random.PRNGKey(0)
  l16 = float(jax.jit(lambda p: objective.loss(p, batch, key, True)[0])(state.params))
  l32 = float(jax.jit(lambda p: f32.loss(p, batch, key, True)[0])(state.params))
  assert abs(l16 - l32) < 0.02 * l32, (l16, l32)
  # Activations are bfloat16; every exp (softmax) and rsqrt (LayerNorm) runs in float32.
  jaxpr = jax.make_jaxpr(lambda p: objective.model.apply({'params': p}, batch['ids'], batch['mask']))(
      state.params).jaxpr
  hidden = jax.eval_shape(lambda p: objective.model.apply({'params': p}, batch['ids'], batch['mask']),
                          state.params)['hidden_BxLxD']
  assert hidden.dtype == jnp.bfloat16
  for prim in ('exp', 'rsqrt'):
    eqns = list(_primitives(jaxpr, prim))
    assert eqns, prim
    assert {str(e.invars[0].aval.dtype) for e in eqns} == {'float32'}, prim
