"""Scanned (nn.scan over stacked layers) and rematerialised encoders compute what the unrolled one does."""

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import posjax
from posjax.errors import ConfigError
from posjax.models import layout
from posjax.models.electra import ElectraPretrainer

BERT = posjax.ModelConfig(vocab_size=60, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                          max_position_embeddings=32, attention='relative_key',
                          attention_options=(('max_relative_position', 8),))
# ALBERT-style sharing: 2 groups of 2 inner layers, each group run for 2 consecutive steps of 4.
ALBERT = dataclasses.replace(BERT, num_layers=4, layer_groups=2, inner_group_size=2, embedding_size=16,
                             attention='absolute', attention_options=(), sentence_head=True)


def _init(model, *args, rngs=None):
  rngs = rngs or {'params': jax.random.PRNGKey(0)}
  return jax.jit(lambda: nn.unbox(model.init(rngs, *args)['params']))()


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 60, size=(2, 12)).astype(np.int32)
  ids[1, 9:] = 0
  return jnp.asarray(ids)


# Compiling on 2 CPU cores dominates: BERT with remat runs by default, the rest with `-m slow`.
@pytest.mark.parametrize('cfg, policy', [pytest.param(BERT, 'none', marks=pytest.mark.slow),
                                         (BERT, 'dots_saveable'),
                                         pytest.param(ALBERT, 'full', marks=pytest.mark.slow)],
                         ids=['bert', 'bert-remat', 'albert-groups-remat'])
def test_scan_matches_unrolled_outputs_and_gradients(cfg, policy):
  ids = _batch()
  unrolled = posjax.Bert(cfg)
  scanned = posjax.Bert(dataclasses.replace(cfg, scan_layers=True, remat_policy=policy))
  params = _init(unrolled, ids)
  stacked = layout.stack_layers(cfg, params)
  # The stacked tree is exactly what the scanned model initialises (same paths and shapes).
  fresh = jax.eval_shape(lambda: nn.unbox(scanned.init(jax.random.PRNGKey(1), ids)['params']))
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, stacked)

  def loss(model, p):
    out = model.apply({'params': p}, ids)
    return (out['mlm_logits_BxLxV'] ** 2).mean() + (out['pooled_BxD'] ** 2).sum(), out

  (l_u, out_u), g_u = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p), has_aux=True))(params)
  (l_s, out_s), g_s = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p), has_aux=True))(stacked)
  np.testing.assert_allclose(out_s['hidden_BxLxD'], out_u['hidden_BxLxD'], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(l_s, l_u, rtol=1e-5, atol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(layout.stack_layers(cfg, g_u)),
                          jax.tree_util.tree_leaves(g_s)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  back = layout.unstack_layers(cfg, stacked)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), back, params))


def test_scanned_parameters_carry_a_layers_axis():
  cfg = dataclasses.replace(BERT, scan_layers=True)
  boxed = jax.eval_shape(lambda: posjax.Bert(cfg).init(jax.random.PRNGKey(0), _batch())['params'])
  q = boxed['encoder']['layers']['block']['layer_0']['attention']['query']['kernel']
  assert q.names == ('layers', 'embed', 'heads', 'kv') and q.value.shape == (2, 32, 2, 16)


@pytest.mark.slow
def test_electra_pretrainer_stacks_both_encoders():
  cfg = dataclasses.replace(BERT, num_layers=2, num_heads=4, embedding_size=16)
  ids = _batch()
  args = (ids, ids > 0, jnp.zeros_like(ids), jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3), jnp.int32),
          jnp.ones((2, 3)))
  rngs = {'params': jax.random.PRNGKey(0), 'sample': jax.random.PRNGKey(1)}
  params = _init(ElectraPretrainer(cfg), *args, rngs=rngs)
  stacked = layout.stack_layers(cfg, params)
  assert set(stacked['generator']['encoder']) == set(stacked['discriminator']['encoder']) == {'layers'}
  scanned = ElectraPretrainer(dataclasses.replace(cfg, scan_layers=True))
  def apply(model, p):
    return jax.jit(lambda p: model.apply({'params': p}, *args, rngs={'sample': jax.random.PRNGKey(2)}))(p)
  a, b = apply(ElectraPretrainer(cfg), params), apply(scanned, stacked)
  np.testing.assert_allclose(b['discriminator_logits_BxL'], a['discriminator_logits_BxL'], atol=2e-5)


@pytest.mark.slow
def test_hf_export_of_scanned_params_is_unrolled(tmp_path):
  pytest.importorskip('transformers')
  from posjax.convert import hf_bert
  cfg = dataclasses.replace(BERT, attention='absolute', attention_options=())
  params = _init(posjax.Bert(cfg), _batch())
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
  hf_bert.export_bert(scanned_cfg, layout.stack_layers(cfg, params), str(tmp_path))
  cfg2, params2 = hf_bert.import_bert(str(tmp_path))
  assert not cfg2.scan_layers
  np.testing.assert_allclose(params2['encoder']['layer_1']['output']['kernel'],
                             params['encoder']['layer_1']['output']['kernel'])


def test_bad_remat_policy_and_layouts():
  with pytest.raises(ConfigError, match="remat_policy 'dots'.*none, full, dots_saveable"):
    dataclasses.replace(BERT, remat_policy='dots')
  params = jax.eval_shape(lambda: nn.unbox(posjax.Bert(BERT).init(jax.random.PRNGKey(0), _batch())['params']))
  with pytest.raises(ConfigError, match='already unrolled'):
    layout.unstack_layers(BERT, params)
  with pytest.raises(ConfigError, match='already scanned'):
    layout.stack_layers(BERT, layout.stack_layers(BERT, params))


def compile_seconds(num_layers: int, scan: bool) -> float:
  """Seconds to lower and compile one value-and-grad step of a BERT-base-width model of `num_layers`."""
  cfg = posjax.ModelConfig(vocab_size=1000, hidden_size=256, num_layers=num_layers, num_heads=4,
                           intermediate_size=1024, max_position_embeddings=128, scan_layers=scan,
                           remat_policy='full', hidden_dropout=0.0, attention_dropout=0.0)
  model = posjax.Bert(cfg)
  ids = jnp.ones((8, 128), jnp.int32)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), ids)['params']))

  def step(p, x):
    return jax.grad(lambda p: model.apply({'params': p}, x)['mlm_logits_BxLxV'].astype(jnp.float32).mean())(p)

  t = time.perf_counter()
  jax.jit(step).lower(params, ids).compile()
  return time.perf_counter() - t


@pytest.mark.slow
def test_compile_time_does_not_grow_with_depth_under_scan():
  times = {(n, scan): compile_seconds(n, scan) for scan in (True, False) for n in (2, 24)}
  print('compile seconds (layers, scan): ' + ', '.join(f'{k}: {v:.2f}' for k, v in times.items()))
  assert times[(24, True)] < 1.5 * times[(2, True)], times
