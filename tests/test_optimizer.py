"""optimizer.clip_by_global_norm against optax.clip_by_global_norm (the oracle), alone and inside AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posjax.training import optimizer


def _tree(scale):
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return {'w': scale * jax.random.normal(k[0], (5, 7)), 'b': scale * jax.random.normal(k[1], (7,)),
          'h': {'x': scale * jax.random.normal(k[2], (2, 3, 4))}}


@pytest.mark.parametrize('scale', [0.0, 0.01, 1.0, 100.0])  # zero, unclipped, around and far over the limit
def test_matches_optax_clip(scale):
  g = _tree(scale)
  ours, _ = optimizer.clip_by_global_norm(1.0).update(g, optax.EmptyState())
  ref, _ = optax.clip_by_global_norm(1.0).update(g, optax.clip_by_global_norm(1.0).init(g))
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
  if scale <= 0.01:  # under the limit the gradient passes through bit for bit
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(g)):
      np.testing.assert_array_equal(a, b)
  else:
    assert float(optax.tree.norm(ours)) == pytest.approx(1.0, rel=1e-6)


def test_adamw_steps_match_optax_chain():
  params = _tree(1.0)
  ours = optax.chain(optimizer.clip_by_global_norm(0.5), optax.adamw(1e-2, weight_decay=0.01))
  ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2, weight_decay=0.01))
  p1, s1, p2, s2 = params, ours.init(params), params, ref.init(params)
  for i in range(5):
    g = jax.tree_util.tree_map(lambda x, i=i: jnp.sin(x * (i + 1)) * 3.0, p1)
    u1, s1 = ours.update(g, s1, p1)
    u2, s2 = ref.update(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_given_global_norm_is_the_one_clipped_by():
  g = _tree(100.0)
  clip = optimizer.clip_by_global_norm(1.0)
  own, _ = clip.update(g, optax.EmptyState())
  given, _ = clip.update(g, optax.EmptyState(), global_norm=optax.tree.norm(g))
  for a, b in zip(jax.tree_util.tree_leaves(own), jax.tree_util.tree_leaves(given)):
    np.testing.assert_array_equal(a, b)
  # a different norm changes the scale, so the argument is really used (and optax.chain forwards it)
  halved, _ = optax.chain(clip).update(g, ((optax.EmptyState(),)), global_norm=2 * optax.tree.norm(g))
  assert float(optax.tree.norm(halved)) == pytest.approx(0.5, rel=1e-6)


def test_train_step_hands_its_gradient_norm_to_the_optimizer():
  from posjax.training import steps

  class Loss:
    def loss(self, params, batch, rng, deterministic, denominators=None):  # pylint: disable=unused-argument
      loss = jnp.sum(params['w'] ** 2)
      return loss, {'loss': loss}

  seen = optax.GradientTransformationExtraArgs(
      lambda p: optax.EmptyState(),
      lambda u, s, p=None, global_norm=None, **kw: (jax.tree_util.tree_map(
          lambda x: jnp.full_like(x, global_norm), u), s))
  params = {'w': jnp.array([3.0, 4.0])}
  state = steps.TrainState(step=jnp.int32(0), params=params, opt_state=seen.init(params),
                           rng=jax.random.PRNGKey(0), skipped=jnp.int32(0), first_bad_step=jnp.int32(-1))
  state, m = steps.train_step(state, {}, objective=Loss(), tx=seen, lr_schedule=lambda s: 0.0)
  assert float(m['grad_norm']) == pytest.approx(10.0)  # |2w| = |(6, 8)|
  np.testing.assert_allclose(state.params['w'], [13.0, 14.0])  # w + global_norm
