"""layers.broadcast_batch (a leading-1 array repeated over rows: an outer product with ones when compiled for
the CPU, a broadcast for other platforms) against autodiff of jnp.broadcast_to and a NumPy sum, in both
directions; layers.argmax_last against NumPy's argmax;
layers.DenseGeneral (2-D product for trailing axes, dot_general otherwise) against NumPy's einsum."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posjax.layers import DenseGeneral, argmax_last, broadcast_batch


@pytest.mark.parametrize('shape', [(1, 3, 5, 5), (1, 11)])
@pytest.mark.parametrize('dtype, tol', [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_broadcast_batch_value_and_gradient_match_a_plain_broadcast(shape, dtype, tol):
  bias = jax.random.normal(jax.random.PRNGKey(0), shape, dtype)
  out_shape = (7,) + shape[1:]
  d = jax.random.normal(jax.random.PRNGKey(1), out_shape, dtype)
  ours, vjp = jax.vjp(lambda b: broadcast_batch(b, 7), bias)
  ref, vjp_ref = jax.vjp(lambda b: jnp.broadcast_to(b, out_shape), bias)
  np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(ref, np.float32))
  (g,), (g_ref,) = vjp(d), vjp_ref(d)
  assert g.shape == bias.shape and g.dtype == dtype
  np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=tol, atol=tol)
  # and against a direct NumPy sum over the rows
  np.testing.assert_allclose(np.asarray(g, np.float32)[0], np.asarray(d, np.float32).sum(0), rtol=tol,
                             atol=tol * 10)


@pytest.mark.parametrize('variant', ['tisa', 'relative_key_query'])
def test_forward_mode_passes_through_broadcast_batch_and_a_model_using_it(variant):
  bias = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 4))
  t = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 4))
  _, tangent = jax.jvp(lambda b: broadcast_batch(b, 5), (bias,), (t,))
  np.testing.assert_array_equal(tangent, np.broadcast_to(t, (5, 3, 4)))
  # A BERT whose score terms go through a batch-shared bias and the skew (TISA) or the blocked q.r / k.r
  # products (relative_key_query), with the MLM decoder bias: jvp against a central difference. No custom
  # VJP may sit on these paths (JAX cannot differentiate one in forward mode).
  import posjax
  cfg = posjax.ModelConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=20,
                           max_position_embeddings=16, attention=variant)
  ids = jax.random.randint(jax.random.PRNGKey(2), (3, 7), 5, 40)
  model = posjax.Bert(cfg)
  params = nn.unbox(jax.jit(lambda: model.init(jax.random.PRNGKey(0), ids))())['params']
  direction = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.1, params)
  f = lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, ids)['mlm_logits_BxLxV']))  # noqa: E731
  _, df = jax.jvp(f, (params,), (direction,))
  eps = 1e-2
  shift = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * d, params, direction)  # noqa: E731
  fd = (f(shift(eps)) - f(shift(-eps))) / (2 * eps)
  np.testing.assert_allclose(float(df), float(fd), rtol=2e-2)


@pytest.mark.parametrize('platform, product', [('cpu', True), ('tpu', False), ('cuda', False)])
def test_broadcast_batch_is_a_ones_product_only_when_compiled_for_the_cpu(platform, product):
  # Decided by the platform the computation is lowered for (here without that platform present), not by the
  # host: gradients included.
  f = lambda b, d: jnp.sum(broadcast_batch(b, 7) * d)  # noqa: E731
  args = (jnp.ones((1, 3, 5), jnp.float32), jnp.ones((7, 3, 5), jnp.float32))
  text = jax.jit(jax.value_and_grad(f)).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert ('dot_general' in text) == product and ('HIGHEST' in text) == product


@pytest.mark.parametrize('dtype', [np.float32, np.int32])
def test_argmax_last_is_numpys_argmax_including_ties(dtype):
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 4, (4, 6, 50)).astype(dtype)  # few distinct values: many tied maxima
  x[0, 0] = 7  # a row that is all one value
  got = np.asarray(jax.jit(argmax_last)(x))
  np.testing.assert_array_equal(got, np.argmax(x, -1))
  assert got.dtype == np.int32


def test_argmax_last_marks_a_row_with_nan():
  x = np.array([[0.0, np.nan, 1.0], [0.0, 2.0, 1.0]], np.float32)
  np.testing.assert_array_equal(np.asarray(argmax_last(x)), [3, 1])


@pytest.mark.parametrize('axis, features, names', [
    (-1, (3, 4), ('a', 'b', 'c')),          # x . W[6, 3, 4]: the q/k/v projection's shape
    ((-2, -1), 5, ('a', 'b', 'c')),         # W[2, 6, 5] over two trailing axes: the output projection's
    (1, 5, ('a', 'b')),                     # a middle axis: the dot_general path
])
def test_dense_general_matches_numpy_einsum(axis, features, names):
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (3, 2, 6) if axis != 1 else (3, 7, 4)), np.float32)
  m = DenseGeneral(features=features, names=names, axis=axis)
  params = nn.unbox(m.init(jax.random.PRNGKey(1), x))['params']
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # a non-zero bias
  w, b = np.asarray(params['kernel']), np.asarray(params['bias'])
  ref = {-1: lambda: np.einsum('bld,dhk->blhk', x, w), (-2, -1): lambda: np.einsum('bhd,hdo->bo', x, w),
         1: lambda: np.einsum('bld,lo->bdo', x, w)}[axis]() + b
  np.testing.assert_allclose(np.asarray(m.apply({'params': params}, x)), ref, rtol=1e-5, atol=1e-5)
