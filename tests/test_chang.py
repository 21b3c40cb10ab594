"""posjax against the authors' code of Chang et al. 2021 (tests/chang_reference.py, a NumPy transcription of
their BertSelfAttention and output projection): their random weights, mapped by posjax.convert.chang, give
posjax's MultiHeadAttention output on real tokens of a padded batch within 1e-5 (float32), for every setting
of their flags below; posjax's initial parameters, written in their layout, follow the distributions their
code draws from."""

import math

import jax
import numpy as np
import pytest

import chang_reference as ref
import posjax
from posjax.attention import MultiHeadAttention
from posjax.convert import chang
from posjax.errors import ConfigError

B, L, D, H = 2, 10, 32, 4
TOL = 1e-5

# (attention_kernel, qk, value_forward, remove_qk): their flags.
SETTINGS = [
    # composite kernels with q.k (k = 2 on 10 tokens: most pairs clipped)
    ('qk_convfixed 2', 'linear', 'feedforward', False),
    ('qk_convq 2', 'linear', 'feedforward', False),
    ('qk_convk 2', 'linear', 'feedforward', False),
    ('qk_convfixed_convq_convk 2', 'linear', 'feedforward', False),
    # without q.k (their code builds only with both convq and convk); --remove_qk: q, k = the hidden states
    ('convfixed_convq_convk 2', 'linear', 'feedforward', False),
    ('convq_convk 3', 'linear', 'feedforward', True),
    # the convolution of values added to the output, fixed and learned scale
    ('qk_convolution 2', 'linear', 'feedforward', False),
    ('qk_convfixed_convolution_scaled 1', 'linear', 'feedforward', False),
    # convolutional queries/keys/values: separable mixed, with activation, full grouped, mixed grouped values
    ('dot_product', 'convolution_depth_mixed_no_act 2 1', 'convolution_depth_mixed_no_act 2 1', False),
    ('dot_product', 'convolution_depth_mixed 1 1', 'feedforward', False),
    ('dot_product', 'convolution 1 4', 'convolution 1 4', False),
    ('dot_product', 'linear', 'convolution_mixed 2 2', False),
    ('dot_product', 'convolution_depth 1 1', 'feedforward', False),
    # all together
    ('qk_convq_convk_convolution_scaled 2', 'convolution_depth_mixed_no_act 1 1',
     'convolution_depth_mixed_no_act 1 1', False),
]


def posjax_config(kernel, qk, value, remove_qk, hidden=D, heads=H, length=L):
  settings = chang.attention_settings(kernel, qk, value, remove_qk, remove_position_embeddings=True)
  return posjax.ModelConfig.from_dict(dict(
      vocab_size=50, hidden_size=hidden, num_heads=heads, num_layers=1, intermediate_size=37,
      max_position_embeddings=length, hidden_dropout=0.0, attention_dropout=0.0, **settings))


def padded_batch(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, L, D)).astype(np.float32)  # padding holds non-zero values on purpose
  mask = np.ones((B, L), bool)
  mask[1, 6:] = False
  return x, mask


@pytest.mark.parametrize('kernel,qk,value,remove_qk', SETTINGS)
def test_matches_the_authors_forward_pass(kernel, qk, value, remove_qk):
  flags = ref.Flags(D, H, kernel, qk, value, remove_qk)
  state = ref.random_state(flags, L, seed=1)
  cfg = posjax_config(kernel, qk, value, remove_qk)
  params = chang.import_attention(cfg, {k: v.astype(np.float32) for k, v in state.items()}, remove_qk=remove_qk)
  x, mask = padded_batch()
  ours = np.asarray(jax.jit(MultiHeadAttention(cfg).apply)({'params': params}, x, mask))
  theirs = ref.forward(flags, state, x, mask)
  np.testing.assert_allclose(ours[mask], theirs[mask], atol=TOL, rtol=0)


def test_their_code_needs_convq_and_convk_without_qk():
  with pytest.raises(AttributeError, match='lightconvq'):
    ref.Flags(D, H, 'convfixed 2')


# ---- initialisation ---------------------------------------------------------------------------------------

INIT_SETTINGS = [
    ('qk_convfixed_convq_convk_convolution_scaled 8', 'convolution_depth_mixed 2 1',
     'convolution_depth_mixed 2 1', False),
    ('qk_convk_convolution 3', 'convolution_mixed 2 4', 'convolution_mixed 2 4', False),
]


def check_distribution(name, x, init):
  """x's moments against the analytic ones of `init`, within 5 standard errors of the sample size."""
  x = np.asarray(x, np.float64).ravel()
  n = x.size
  kind = init[0]
  if kind in ('zeros', 'ones'):
    np.testing.assert_array_equal(x, 0.0 if kind == 'zeros' else 1.0, err_msg=name)
    return
  if kind == 'normal':
    var, mu4 = init[1] ** 2, 3 * init[1] ** 4
  else:  # uniform(-b, b)
    b = init[1]
    var, mu4 = b * b / 3, b ** 4 / 5
    assert np.abs(x).max() <= b, (name, np.abs(x).max(), b)
  assert abs(x.mean()) <= 5 * math.sqrt(var / n), (name, x.mean(), var, n)
  assert abs(x.var() - var) <= 5 * math.sqrt((mu4 - var * var) / n), (name, x.var(), var, n)
  # The family: a uniform sample reaches near its bound, a normal one beyond sqrt(3) sd (uniform's bound).
  if n >= 64:
    edge = math.sqrt(3 * var)
    assert (np.abs(x).max() > 0.8 * edge) if kind == 'uniform' else (np.abs(x).max() > edge), (name, kind)


@pytest.mark.parametrize('kernel,qk,value,remove_qk', INIT_SETTINGS)
def test_initial_parameters_follow_their_distributions(kernel, qk, value, remove_qk):
  d, h, length = 64, 4, 16
  flags = ref.Flags(d, h, kernel, qk, value, remove_qk)
  cfg = posjax_config(kernel, qk, value, remove_qk, hidden=d, heads=h, length=length)
  x, mask = np.zeros((1, length, d), np.float32), np.ones((1, length), bool)
  params = jax.jit(MultiHeadAttention(cfg).init)(jax.random.key(3, impl='rbg'), x, mask)['params']
  state = chang.export_attention(cfg, params)
  want = {'self.' + k: v for k, v in ref.parameters(flags, length).items()}
  want['output.dense.weight'] = ((d, d), ('normal', 0.02))
  want['output.dense.bias'] = ((d,), ('zeros',))
  assert sorted(state) == sorted(want)
  for name, (shape, init) in want.items():
    assert state[name].shape == shape, (name, state[name].shape, shape)
    if init[0] == 'buffer':
      np.testing.assert_array_equal(state[name], init[1], err_msg=name)
    else:
      check_distribution(name, state[name], init)


# ---- the importer ------------------------------------------------------------------------------------------

def test_export_then_import_is_the_identity():
  kernel, qk, value, _ = SETTINGS[-1]
  cfg = posjax_config(kernel, qk, value, False)
  state = ref.random_state(ref.Flags(D, H, kernel, qk, value), L, seed=2)
  params = chang.import_attention(cfg, state)
  again = chang.import_attention(cfg, chang.export_attention(cfg, params))
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_settings_read_their_flags():
  s = chang.attention_settings('qk_convfixed_convq_convk 8', 'convolution_depth_mixed_no_act 4 1',
                               'convolution_depth_mixed_no_act 4 1')
  assert s['attention'] == 'absolute+convfixed+convq+convk+convqkv'
  assert s['attention_options'] == dict(
      composite_kernel_size=17, use_qk=True, convqkv_kernel_size=9, convqkv_separable=True, convqkv_groups=1,
      convqkv_mixed=True, convqkv_activation=False, convqkv_targets='qkv')
  s = chang.attention_settings('convolution_scaled 4', remove_position_embeddings=True)
  assert s == {'attention': 'none+convvalues',
               'attention_options': dict(convvalues_kernel_size=9, convvalues_scale=True)}


@pytest.mark.parametrize('flags,match', [
    (dict(qk='convolution_depth 2 1', value_forward='convolution_depth 1 1'), 'one setting'),
    (dict(attention_kernel='convbert'), 'convbert'),
    (dict(qk='convolution_depth 2'), 'R G'),
    (dict(attention_kernel='qk_convq'), 'taps each way'),
])
def test_settings_errors_name_the_flag(flags, match):
  with pytest.raises(ConfigError, match=match):
    chang.attention_settings(**flags)


def test_import_errors_name_the_weight():
  kernel, qk, value, _ = SETTINGS[8]
  cfg = posjax_config(kernel, qk, value, False)
  state = ref.random_state(ref.Flags(D, H, kernel, qk, value), L)
  missing = {k: v for k, v in state.items() if k != 'self.key_pointwise.weight'}
  with pytest.raises(ConfigError, match='self.key_pointwise.weight'):
    chang.import_attention(cfg, missing)
  narrow = dict(state, **{'self.query_conv.weight': state['self.query_conv.weight'][:, :, 1:-1]})
  with pytest.raises(ConfigError, match='self.query_conv.weight'):
    chang.import_attention(cfg, narrow)
  with pytest.raises(ConfigError, match='self.extra'):
    chang.import_attention(cfg, dict(state, **{'self.extra': np.zeros(3)}))
  tisa = posjax.ModelConfig(vocab_size=50, hidden_size=D, num_heads=H, num_layers=1, intermediate_size=37,
                            attention='tisa')
  with pytest.raises(ConfigError, match='tisa'):
    chang.import_attention(tisa, state)


def test_an_unlearned_scale_must_be_one():
  kernel = 'qk_convolution 2'
  cfg = posjax_config(kernel, 'linear', 'feedforward', False)
  state = ref.random_state(ref.Flags(D, H, kernel), L)
  chang.import_attention(cfg, state)
  state['self.convolution_scalar'] = state['self.convolution_scalar'] * 2.0
  with pytest.raises(ConfigError, match='convvalues_scale=True'):
    chang.import_attention(cfg, state)
