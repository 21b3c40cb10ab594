"""Properties every registered attention variant must have, and a short BERT training run per variant.

Per-variant oracles live in the family test files; this file holds what all of them share: padding
invariance, translation equivariance without absolute positions, finite gradients under jit, bfloat16, and
falling MLM loss on real text.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import posjax
from helpers import init_state
from posjax.attention import registry
from posjax.data import corpus, pipeline, pretrain, tokenizer
from posjax.training import objectives, steps

COMBINATIONS = ['absolute+convfixed', 'tisa+convq', 'relative_key+convvalues', 'rope+alibi', 'none+t5']
EMBEDDINGS = ('absolute', 'sinusoidal', 'none')


def variants():
  singles = [n for n in registry.names()]
  combos = [c for c in COMBINATIONS if all(p in registry.names() for p in c.split('+'))]
  return singles + combos


def small_config(variant, **kw):
  return posjax.ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                            max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0,
                            attention=variant, **kw)


def perturbed_init(model, ids, seed=0):
  """Initialise, then perturb every parameter: zero-initialised terms (biases, relative tables) must matter.
  The initialisers run under jit with a key of the 'unsafe_rbg' generator and the perturbation comes from
  NumPy: with threefry keys, op by op, compiling them took ~20 s per model on 2 busy cores (now ~3), and which
  random numbers they are does not matter here."""
  params = jax.jit(lambda ids: nn.unbox(model.init(jax.random.key(seed, impl='unsafe_rbg'), ids)['params']))(ids)
  rng = np.random.default_rng(seed + 1)
  return jax.tree.map(lambda p: p + (0.1 * rng.standard_normal(p.shape)).astype(p.dtype), params)


def has_absolute_positions(variant):
  return registry.parse(variant).position_embedding is not None and \
      registry.parse(variant).position_embedding.name != 'none'


# The tests below that use it are parametrized with scope='module': pytest then orders them variant by variant,
# so that each worker process compiles a variant's programs once, not both.
@pytest.fixture(scope='module')
def apply_fn():
  """(fn, params) per variant and compute dtype: fn(params, ids, mask) -> (hidden_BxLxD, the gradients of a
  loss that every parameter reaches through the MLM logits and the pooled output), one compiled program for
  every float32 check of this file (compiling is most of their time). bfloat16: the forward pass alone, with
  None for the gradients (its backward pass takes ~3x as long to compile on XLA:CPU). Parameters are float32
  in both dtypes."""
  cache = {}

  def get(variant, dtype=jnp.float32):
    key = (variant, dtype)
    if key not in cache:
      model = posjax.Bert(small_config(variant, dtype=dtype))
      params = get(variant)[1] if dtype != jnp.float32 else perturbed_init(model, jnp.ones((2, 24), jnp.int32))

      def fn(p, ids, mask):
        def loss(p):
          out = model.apply({'params': p}, ids, mask)
          logits, pooled = (out[k].astype(jnp.float32) for k in ('mlm_logits_BxLxV', 'pooled_BxD'))
          return jnp.mean(logits ** 2) + jnp.mean(pooled ** 2), out['hidden_BxLxD']
        if dtype != jnp.float32:
          return model.apply({'params': p}, ids, mask)['hidden_BxLxD'], None
        return jax.grad(loss, has_aux=True)(p)[::-1]
      cache[key] = (jax.jit(fn), params)
    return cache[key]
  return get


def hidden(fn):
  return lambda *args: fn(*args)[0]


@pytest.mark.parametrize('variant', variants(), scope='module')
def test_padding_does_not_change_real_tokens(variant, apply_fn):
  fn, params = apply_fn(variant)
  fn = hidden(fn)
  rng = np.random.default_rng(0)
  ids = np.zeros((2, 24), np.int32)
  ids[:, :13] = rng.integers(5, 97, size=(2, 13))
  short = fn(params, ids, ids != 0)
  ids2 = ids.copy()
  ids2[1, :] = 0
  ids2[1, :9] = ids[1, :9]  # row 1 now has 9 real tokens and more padding
  out = fn(params, ids2, ids2 != 0)
  np.testing.assert_allclose(out[0, :13], short[0, :13], atol=1e-5, rtol=0)
  ref9 = np.zeros_like(ids)
  ref9[:, :9] = ids[:, :9]
  np.testing.assert_allclose(out[1, :9], fn(params, ref9, ref9 != 0)[1, :9], atol=1e-5, rtol=0)
  # Padding ids other than [PAD] at masked positions must not matter either.
  noisy = ids.copy()
  noisy[:, 13:] = rng.integers(5, 97, size=(2, 11))
  np.testing.assert_allclose(fn(params, noisy, ids != 0)[:, :13], short[:, :13], atol=1e-5, rtol=0)


@pytest.mark.parametrize('variant', [v for v in variants() if not has_absolute_positions(v)], scope='module')
def test_translation_equivariance_without_absolute_positions(variant, apply_fn):
  fn, params = apply_fn(variant)
  fn = hidden(fn)
  rng = np.random.default_rng(1)
  seq = rng.integers(5, 97, size=10)
  ids = np.zeros((2, 24), np.int32)
  mask = np.zeros((2, 24), bool)
  ids[0, :10], mask[0, :10] = seq, True
  ids[1, 7:17], mask[1, 7:17] = seq, True  # the same sequence, shifted right by 7 inside padding
  out = fn(params, ids, mask)
  np.testing.assert_allclose(out[1, 7:17], out[0, :10], atol=1e-5, rtol=0)


@pytest.mark.parametrize('variant', [v for v in variants() if has_absolute_positions(v)], scope='module')
def test_absolute_positions_break_translation_equivariance(variant, apply_fn):
  fn, params = apply_fn(variant)
  fn = hidden(fn)
  seq = np.random.default_rng(1).integers(5, 97, size=10)
  ids = np.zeros((2, 24), np.int32)
  ids[0, :10], ids[1, 7:17] = seq, seq
  out = fn(params, ids, ids != 0)
  assert np.abs(out[1, 7:17] - out[0, :10]).max() > 1e-3


@pytest.mark.parametrize('variant', variants(), scope='module')
def test_gradients_are_finite_and_reach_every_parameter(variant, apply_fn):
  fn, params = apply_fn(variant)
  ids = np.random.default_rng(2).integers(5, 97, size=(2, 24)).astype(np.int32)
  ids[1, 15:] = 0
  _, grads = fn(params, ids, ids != 0)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(g)).all(), path
    assert np.abs(np.asarray(g)).max() > 0, f'no gradient reaches {jax.tree_util.keystr(path)}'


@pytest.mark.parametrize('variant', [v if '+' not in v else pytest.param(v, marks=pytest.mark.slow)
                                     for v in variants()], scope='module')
def test_bfloat16_runs(variant, apply_fn):
  fn, params = apply_fn(variant, jnp.bfloat16)
  ids = np.random.default_rng(3).integers(5, 97, size=(2, 24)).astype(np.int32)
  out, _ = fn(params, ids, ids != 0)
  assert out.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(out, np.float32)).all()
  ref, _ = apply_fn(variant)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref(params, ids, ids != 0)[0], atol=0.15)


@pytest.fixture(scope='module')
def real_batches():
  docs = corpus.default_corpus().documents[:300]
  tok = tokenizer.train_wordpiece(docs, vocab_size=800)
  specials = pretrain.Specials.from_tokenizer_ids(tokenizer.special_ids(tok))
  x = pretrain.pack([e.ids for e in tok.encode_batch(docs, add_special_tokens=False)], 32, specials)
  return pipeline.MLMBatches(x, 16, specials, tok.get_vocab_size(), seed=0), tok.get_vocab_size()


# Every component learns in the default suite, here or through the trainer (absolute: test_train, convbert:
# test_electra); the combinations, whose parts train alone, are slow.
@pytest.mark.parametrize('variant', [
    pytest.param(v, marks=pytest.mark.slow) if '+' in v or v in ('absolute', 'convbert') else v for v in variants()])
def test_bert_tiny_trains(variant, real_batches):
  data, vocab = real_batches
  cfg = posjax.ModelConfig(vocab_size=vocab, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128,
                           max_position_embeddings=64, attention=variant)
  objective = objectives.MaskedLM(posjax.Bert(cfg), 32, data.max_predictions)
  tx = optax.adamw(3e-3)
  state = init_state(objective, tx)
  step = jax.jit(functools.partial(steps.train_step, objective=objective, tx=tx, lr_schedule=lambda s: 3e-3))
  losses = []
  for i in range(30):
    state, m = step(state, data.batch(i))
    losses.append(float(m['loss']))
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses


@pytest.mark.parametrize('variant', variants())
def test_no_batch_heads_length_length_headdim_tensor(variant):
  """No intermediate of the forward or backward pass is as large as a [B, H, L, L, Dh] tensor."""
  cfg = small_config(variant)
  model = posjax.Bert(cfg)
  b, l = 2, 24
  ids = jnp.ones((b, l), jnp.int32)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), ids)['params']))

  def loss(p):
    return jnp.sum(model.apply({'params': p}, ids)['hidden_BxLxD'])

  jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
  limit = b * cfg.num_heads * l * l * cfg.head_dim

  def subjaxprs(value):
    if hasattr(value, 'eqns'):
      yield value
    elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
      yield value.jaxpr
    elif isinstance(value, (list, tuple)):
      for v in value:
        yield from subjaxprs(v)

  def sizes(jx):
    for eqn in jx.eqns:
      for v in eqn.outvars:
        yield int(np.prod(v.aval.shape)) if hasattr(v.aval, 'shape') else 0
      for value in eqn.params.values():
        for sub in subjaxprs(value):
          yield from sizes(sub)

  all_sizes = list(sizes(jaxpr.jaxpr))
  # The scan over sub-jaxprs must see the attention itself: [B, H, L, L] logits are among the outputs.
  assert b * cfg.num_heads * l * l in all_sizes or 'convbert' in variant
  assert max(all_sizes) < limit, (max(all_sizes), limit)


@pytest.mark.parametrize('variant', [v for v in variants() if registry.parse(v).score])
def test_no_gather_or_scatter_over_the_length_by_length_grid(variant):
  """Position terms spread over LxL by reshapes (relative.skew / toeplitz), not by indexing with an LxL array:
  the gradient of such a gather is a scatter-add that the TPU compiler lays out with the heads (and batch)
  last, padded to 128 lanes: TISA's and T5's temporaries were 1.5x absolute's on a v5e, composite's 2.1x."""
  cfg = small_config(variant)
  model = posjax.Bert(cfg)
  b, l = 2, 24  # L differs from every other dimension here
  ids = jnp.ones((b, l), jnp.int32)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), ids)['params']))
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, ids)['hidden_BxLxD'])))(params)

  def eqns(jx):
    for eqn in jx.eqns:
      yield eqn
      for value in eqn.params.values():
        for sub in (value if isinstance(value, (list, tuple)) else [value]):
          inner = getattr(sub, 'jaxpr', sub)
          if hasattr(inner, 'eqns'):
            yield from eqns(inner)

  grid = [str(e.primitive) for e in eqns(jaxpr.jaxpr) if str(e.primitive) in ('gather', 'scatter-add', 'scatter')
          and any(list(getattr(v.aval, 'shape', ())).count(l) >= 2 for v in list(e.invars) + list(e.outvars))]
  assert not grid, grid
