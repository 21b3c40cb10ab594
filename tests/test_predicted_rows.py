"""`only_predicted_rows`: the last layer's token-wise work on [CLS] and the predicted positions only must give
the heads exactly what the full encoder gives them, values and gradients, whatever the variant and layout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import posjax

BASE = dict(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=40,
            max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)


def _batch():
  ids = jax.random.randint(jax.random.PRNGKey(1), (3, 12), 5, 60)
  mask = jnp.arange(12)[None, :] < jnp.array([[12], [9], [5]])
  pos = jnp.array([[1, 4, 11, 7], [0, 8, 2, 2], [3, 1, 4, 0]])  # unsorted, repeated, 0: as batches have
  return ids, mask, pos


@pytest.mark.parametrize('fields', [
    dict(),
    dict(attention='relative_key_query'),
    pytest.param(dict(attention='tisa'), marks=pytest.mark.slow),
    pytest.param(dict(attention='absolute+convbert'), marks=pytest.mark.slow),
    dict(attention='none+convfixed+convq+convk'),
    dict(layer_groups=1, embedding_size=16, sentence_head=True),  # ALBERT: one shared layer
    pytest.param(dict(remat_policy='full'), marks=pytest.mark.slow),
    dict(scan_layers=True),
], ids=lambda f: ','.join(f'{k}={v}' for k, v in f.items()) or 'bert')
def test_heads_and_gradients_match_the_full_encoder(fields):
  cfg = posjax.ModelConfig(**{**BASE, **fields})
  model = posjax.Bert(cfg)
  ids, mask, pos = _batch()
  params = nn.unbox(jax.jit(lambda: model.init(jax.random.PRNGKey(0), ids, mask, mlm_positions_BxP=pos))())['params']

  def run(p, sparse):
    out = model.apply({'params': p}, ids, mask, mlm_positions_BxP=pos, only_predicted_rows=sparse)
    heads = {k: v for k, v in out.items() if not k.startswith('hidden')}
    loss = sum(jnp.sum(jnp.sin(v)) for v in heads.values())
    return loss, (heads, out)

  (loss_f, (full, out_f)), g_f = jax.value_and_grad(run, has_aux=True)(params, False)
  (loss_s, (part, out_s)), g_s = jax.value_and_grad(run, has_aux=True)(params, True)
  assert set(full) == set(part) and {'mlm_logits_BxLxV', 'pooled_BxD'} <= set(full)
  for k in full:
    np.testing.assert_allclose(part[k], full[k], atol=2e-5, rtol=0, err_msg=k)
  rows = jnp.concatenate([jnp.zeros((3, 1), jnp.int32), pos], axis=1)
  np.testing.assert_allclose(out_s['hidden_BxRxD'],
                             jnp.take_along_axis(out_f['hidden_BxLxD'], rows[..., None], 1), atol=2e-5, rtol=0)
  assert 'hidden_BxLxD' not in out_s
  np.testing.assert_allclose(loss_s, loss_f, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_f), jax.tree_util.tree_leaves(g_s)):
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_the_last_layer_really_runs_on_fewer_rows():
  """The saving is real: XLA counts fewer FLOPs (the feed-forward of one layer on 5 of 12 rows)."""
  cfg = posjax.ModelConfig(**BASE)
  model = posjax.Bert(cfg)
  ids, mask, pos = _batch()
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), ids, mask, mlm_positions_BxP=pos))()['params']
  flops = [jax.jit(lambda p, s=s: model.apply({'params': p}, ids, mask, mlm_positions_BxP=pos,
                                              only_predicted_rows=s)['mlm_logits_BxLxV']).lower(params)
           .compile().cost_analysis()['flops'] for s in (False, True)]
  ffn_per_row = 2 * 2 * BASE['hidden_size'] * BASE['intermediate_size']  # 2 matmuls, 2 FLOPs per MAC
  assert flops[0] - flops[1] >= ffn_per_row * 3 * (12 - 5), flops  # 3 sequences, 7 rows skipped in each


@pytest.mark.parametrize('fields', [dict(discriminator_head=True, pooler=False), dict()])
def test_needs_positions_with_an_mlm_head_and_no_per_token_head(fields):
  cfg = posjax.ModelConfig(**{**BASE, **fields})
  ids, mask, pos = _batch()
  model = posjax.Bert(cfg)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), ids, mask))()['params']
  with pytest.raises(ValueError, match='only_predicted_rows needs a model without a discriminator head'):
    model.apply({'params': params}, ids, mask, mlm_positions_BxP=pos if fields else None,
                only_predicted_rows=True)


@pytest.mark.parametrize('fields', [dict(), dict(attention='relative_key_query'), dict(scan_layers=True)],
                         ids=lambda f: ','.join(f'{k}={v}' for k, v in f.items()) or 'bert')
def test_a_classifier_runs_the_last_layer_on_cls_alone(fields):
  """Fine-tuning's Classifier reads [CLS] only: its logits and gradients equal those of the full encoder."""
  from posjax.finetune.model import Classifier
  cfg = posjax.ModelConfig(**{**BASE, **fields, 'mlm_head': False})
  ids, mask, _ = _batch()
  model = Classifier(cfg, 3)
  params = nn.unbox(jax.jit(lambda: model.init(jax.random.PRNGKey(0), ids, mask, jnp.zeros_like(ids)))())['params']

  def full(p):  # the same head on the full encoder's [CLS] row
    out = posjax.Bert(cfg).apply({'params': p['bert']}, ids, mask)
    return out['pooled_BxD'] @ p['out']['kernel'] + p['out']['bias']

  ref, g_ref = jax.value_and_grad(lambda p: jnp.sum(jnp.sin(full(p))))(params)
  got, g = jax.value_and_grad(lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, ids, mask,
                                                                      jnp.zeros_like(ids)))))(params)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree_util.tree_leaves(g)):
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
