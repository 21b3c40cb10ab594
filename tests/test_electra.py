"""ELECTRA replaced-token detection: sampling, labels, shared embeddings, and training each model family."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import posjax
from helpers import load_config_module
from posjax.models.electra import ElectraPretrainer, generator_config
from posjax.training import pretraining

PAD, CLS, SEP, MASK = 0, 2, 3, 4


def pretrainer(vocab=30, **kw):
  cfg = posjax.ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48,
                           max_position_embeddings=32, embedding_size=16, hidden_dropout=0.0,
                           attention_dropout=0.0, **kw)
  return ElectraPretrainer(cfg, generator_fraction=0.5, forbidden_ids=(PAD, CLS, SEP))


def batch(b=64, l=12, p=4, seed=0, vocab=30):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, size=(b, l)).astype(np.int32)
  ids[:, 0], ids[:, -1] = CLS, SEP
  ids[: b // 2, 8:] = PAD
  ids[: b // 2, 7] = SEP
  positions = np.stack([rng.choice(np.arange(1, 7), size=p, replace=False) for _ in range(b)]).astype(np.int32)
  weights = np.ones((b, p), np.float32)
  weights[:, -1] = 0  # an unused prediction slot
  labels = np.take_along_axis(ids, positions, 1)
  masked = ids.copy()
  np.put_along_axis(masked, positions[:, :-1], MASK, 1)  # unused slots leave their token alone
  return dict(ids=masked, mask=ids != PAD, type_ids=np.zeros_like(ids), positions=positions, labels=labels,
              weights=weights), ids


def run(model, params, b, seed):
  return model.apply({'params': params}, b['ids'], b['mask'], b['type_ids'], b['positions'], b['labels'],
                     b['weights'], rngs={'sample': jax.random.PRNGKey(seed)})


@pytest.fixture(scope='module')
def setup():
  model = pretrainer()
  b, original = batch()
  params = nn.unbox(jax.jit(lambda: model.init({'params': jax.random.PRNGKey(0), 'sample': jax.random.PRNGKey(1)},
                                              b['ids'], b['mask'], b['type_ids'], b['positions'], b['labels'],
                                              b['weights']))()['params'])
  # Make the generator confident about special tokens and about the originals, so that sampling them is
  # likely unless it is prevented.
  bias = np.array(params['generator']['mlm_head']['bias'])
  bias[[PAD, CLS, SEP]] += 12.0
  bias[5:8] += 10.0
  params['generator']['mlm_head']['bias'] = jnp.asarray(bias)
  return model, params, b, original


def test_sampled_tokens_are_never_special(setup):
  model, params, b, _ = setup
  for seed in range(5):
    out = run(model, params, b, seed)
    sampled = np.take_along_axis(np.asarray(out['discriminator_ids_BxL']), b['positions'], 1)[b['weights'] > 0]
    assert not np.isin(sampled, [PAD, CLS, SEP]).any()


def test_labels_are_exactly_replaced_or_not(setup):
  model, params, b, original = setup
  out = run(model, params, b, 7)
  disc_ids = np.asarray(out['discriminator_ids_BxL'])
  replaced = np.asarray(out['replaced_BxL'])
  np.testing.assert_array_equal(replaced, (disc_ids != original) & (original != PAD))
  # Only valid prediction slots changed; the rest of the input is the original text (no [MASK] left).
  changed = disc_ids != original
  slots = np.zeros_like(changed)
  rows = np.arange(len(original))[:, None]
  slots[rows, np.where(b['weights'] > 0, b['positions'], 0)] = b['weights'] > 0
  assert not (changed & ~slots).any()
  assert not (disc_ids == MASK).any()
  # The generator is pushed towards tokens 5-7, so some samples equal the original and count as original.
  at_slots = np.take_along_axis(disc_ids, b['positions'], 1)[b['weights'] > 0]
  orig_at_slots = np.take_along_axis(original, b['positions'], 1)[b['weights'] > 0]
  assert (at_slots == orig_at_slots).any() and (at_slots != orig_at_slots).any()


def test_sampling_follows_the_prng_stream(setup):
  model, params, b, _ = setup
  a, a2, c = (np.asarray(run(model, params, b, s)['discriminator_ids_BxL']) for s in (3, 3, 4))
  np.testing.assert_array_equal(a, a2)
  assert (a != c).any()


def test_embeddings_are_shared_and_generator_is_smaller(setup):
  _, params, _, _ = setup
  assert set(params) == {'embeddings', 'generator', 'discriminator'}
  assert 'embeddings' not in params['generator'] and 'embeddings' not in params['discriminator']
  gen = generator_config(pretrainer().config, 0.25)
  assert (gen.hidden_size, gen.num_heads, gen.intermediate_size, gen.embed_dim) == (8, 1, 12, 16)


# ConvBERT's config in the default suite, which trains with ELECTRA's objective (BERT's MLM runs in test_train,
# ALBERT's MLM+SOP in test_spm; ELECTRA's config builds its objective in test_export and compiles its train step
# in test_aot); the other combinations are `slow`
# (python -m pytest -m slow).
MODELS = [pytest.param('bert', 'tiny,relative_key', marks=pytest.mark.slow),
          pytest.param('albert', 'tiny,tisa', marks=pytest.mark.slow),
          pytest.param('electra', 'tiny', marks=pytest.mark.slow),
          ('convbert', 'tiny,none+convbert'),
          pytest.param('bert', 'tiny', marks=pytest.mark.slow), pytest.param('albert', 'tiny', marks=pytest.mark.slow),
          pytest.param('convbert', 'tiny', marks=pytest.mark.slow),
          pytest.param('bert', 'tiny,absolute+convbert', marks=pytest.mark.slow)]


@pytest.mark.parametrize('name, arg', MODELS)
def test_each_model_pretrains_with_its_objective(tmp_path, name, arg):
  expected = {'bert': 'mlm', 'albert': 'mlm+sop', 'electra': 'electra', 'convbert': 'electra'}[name]
  assert load_config_module(name).get_config(arg).objective == expected  # each config picks its objective
  pretrain_tiny(tmp_path, name, arg, expected)


def test_bert_pretrains_with_next_sentence_prediction(tmp_path):
  pretrain_tiny(tmp_path, 'bert', 'tiny', 'mlm+nsp')


def pretrain_tiny(tmp_path, name, arg, objective):
  variant = arg.split(',')[1] if ',' in arg else None
  if variant and not all(p in posjax.attention.registry.names() for p in variant.split('+')):
    pytest.fail(f'variant {variant} is not registered')
  c = load_config_module(name).get_config(arg)
  c.objective = objective
  c.model.hidden_size, c.model.num_layers, c.model.intermediate_size = 32, 2, 64
  c.model.num_heads = 4 if 'convbert' in c.model.attention else 2
  if c.model.embedding_size:
    c.model.embedding_size = 16
  c.data.vocab_size, c.data.seq_len, c.batch_size = 1000, 32, 16
  c.num_train_steps, c.warmup_steps, c.learning_rate = 60, 5, 3e-3
  c.log_every, c.eval_every, c.checkpoint_every, c.eval_batches = 5, 60, 60, 2
  pretraining.train_and_evaluate(c, str(tmp_path))
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    rows = [r for r in map(json.loads, f) if 'loss' in r]  # training rows (eval rows hold eval_*)
  losses = [r['loss'] for r in rows]
  assert losses[-1] < losses[0] - 0.5, losses
  if objective == 'electra':
    assert 'discriminator_loss' in rows[-1] and rows[-1]['discriminator_loss'] < 0.693
  if objective in ('mlm+sop', 'mlm+nsp'):
    assert 'sentence_loss' in rows[-1]
