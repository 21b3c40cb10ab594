"""BERT module structure: logical axis names on every parameter, dtypes, config validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import posjax
from posjax.errors import ConfigError

AXES = {'vocab', 'embed', 'embed_out', 'mlp', 'heads', 'kv', 'pos', 'norm', 'kernel', 'type', 'groups', 'classes'}


def boxed_params(cfg):
  return jax.jit(lambda: posjax.Bert(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32)))()['params']


def test_every_parameter_has_logical_axis_names():
  params = boxed_params(posjax.ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                                           intermediate_size=24, max_position_embeddings=16))
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert len(leaves) == 5 + 2 * 16 + 2 + 5  # embeddings, 2 layers, pooler, MLM head
  for path, leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim
    assert set(leaf.names) <= AXES, (jax.tree_util.keystr(path), leaf.names)


def test_parameter_count_matches_transformers():
  transformers = pytest.importorskip('transformers')
  hf = transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
      max_position_embeddings=64))
  hf_count = sum(p.numel() for p in hf.parameters()) + 32 * 32 + 32  # + the pooler BertForMaskedLM drops
  cfg = posjax.ModelConfig(vocab_size=120, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=40,
                           max_position_embeddings=64)
  ours = sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(boxed_params(cfg))))
  assert ours == hf_count


def test_bfloat16_compute_with_float32_parameters():
  cfg = posjax.ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24,
                           max_position_embeddings=16, dtype=jnp.bfloat16)
  model = posjax.Bert(cfg)
  ids = jnp.ones((2, 8), jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), ids)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(nn.unbox(variables)))
  out = model.apply(variables, ids)
  assert out['hidden_BxLxD'].dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(out['mlm_logits_BxLxV'], np.float32)).all()


def test_mlm_positions_select_the_same_logits():
  cfg = posjax.ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24,
                           max_position_embeddings=16)
  model = posjax.Bert(cfg)
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 5, 50)
  variables = model.init(jax.random.PRNGKey(0), ids)
  full = model.apply(variables, ids)['mlm_logits_BxLxV']
  pos = jnp.array([[1, 4, 7], [0, 9, 2]])
  part = model.apply(variables, ids, mlm_positions_BxP=pos)['mlm_logits_BxLxV']
  np.testing.assert_allclose(part, jnp.take_along_axis(full, pos[..., None], 1), atol=1e-6)


@pytest.mark.parametrize('fields, message', [
    (dict(hidden_size=30, num_heads=4), r'model.hidden_size \(30\) must be divisible by model.num_heads'),
    (dict(num_layers=0), 'model.num_layers must be a positive integer'),
    (dict(hidden_dropout=1.0), r'model.hidden_dropout must be in \[0, 1\)'),
    (dict(attention='absolute+none'), 'cannot be used together'),
    (dict(attention=''), 'must be a non-empty string'),
    (dict(attention='absolute++none'), 'empty component'),
    (dict(attention_options=(('no_such_option', 1),)), 'unknown attention option.*no_such_option'),
])
def test_bad_model_config(fields, message):
  with pytest.raises(ConfigError, match=message):
    posjax.ModelConfig(**fields)


def test_from_dict_names_unknown_fields():
  with pytest.raises(ConfigError, match=r'unknown model config field\(s\) model.hiden_size'):
    posjax.ModelConfig.from_dict({'hiden_size': 3})
