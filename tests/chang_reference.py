"""A NumPy transcription of the authors' attention (Chang et al. 2021, mlpc-ucsd/BERT_Convolutions,
src/transformers/modeling_bert.py: BertSelfAttention.__init__ and .forward, then BertSelfOutput.dense), for
tests only. It follows their code statement by statement, with their parameter names and layouts (torch
Linear weights [out, in], Conv1d weights [out, in/groups, K]) and their flag parsing by substring, in
float64; it shares nothing with posjax's modules. `parameters` also says how their model initialises each
parameter (BertPreTrainedModel._init_weights re-draws every nn.Linear as N(0, initializer_range) with zero
bias and leaves nn.Conv1d at PyTorch's default; the composite tables are set in __init__).

Their forward needs sequences of exactly max_position_embeddings tokens (their relative-position matrix and
mask reshape are that size); here that length is the batch's.
"""

import math

import numpy as np
from scipy.special import erf


class Flags:
  """BertSelfAttention.__init__'s reading of the config."""

  def __init__(self, hidden_size, num_heads, attention_kernel='dot_product', qk='linear',
               value_forward='feedforward', remove_qk=False):
    self.hidden_size, self.num_heads = hidden_size, num_heads
    self.head_size = hidden_size // num_heads
    self.all_head_size = num_heads * self.head_size
    self.kernel_name, self.value_name = attention_kernel, value_forward
    self.qk_name = 'none' if remove_qk else qk
    sep = attention_kernel.split()
    if len(sep) > 1:
      self.num_positions_each_dir = int(sep[1])
    self.use_qk = 'qk' in attention_kernel or 'dot' in attention_kernel
    self.convfixed = 'convfixed' in attention_kernel
    self.convq = 'convq' in attention_kernel
    self.convk = 'convk' in attention_kernel
    self.use_lightweight_conv = self.convfixed or self.convq or self.convk
    self.use_convolution = 'convolution' in attention_kernel
    self.convolution_scaled = 'convolution_scaled' in attention_kernel
    self.qk_conv = self._conv(self.qk_name)
    self.value_conv = self._conv(self.value_name)
    # Their "Remove unnecessary parameters" block reads self.lightconvq / self.lightconvk, which this version
    # never sets: without q.k their model builds only with both convq and convk.
    if self.use_lightweight_conv and not self.use_qk and not (self.convq and self.convk):
      raise AttributeError("'BertSelfAttention' object has no attribute 'lightconvq'")

  def _conv(self, name):
    """Their `convolution[_mixed][_depth][_no_act] R G` setup: sizes of the conv and the linear part."""
    if name[0:11] != 'convolution':
      return None
    total_out_size = conv_out_size = self.all_head_size
    mixed, depth, act = 'mixed' in name, 'depth' in name, 'no_act' not in name
    if mixed:
      total_out_size = total_out_size // 2
    receptive_field_each_dir = int(name.split()[1])
    num_groups = int(name.split()[2])
    if depth:
      num_groups = self.hidden_size
    else:
      conv_out_size = total_out_size
    return dict(mixed=mixed, depth=depth, act=act, total_out_size=total_out_size, conv_out_size=conv_out_size,
                r=receptive_field_each_dir, groups=num_groups)


def parameters(f: Flags, seq_length, initializer_range=0.02):
  """{their parameter name: (shape, init)} with init ('normal', std) | ('uniform', bound) | ('zeros',) |
  ('ones',) | ('buffer', array)."""
  d, p = f.hidden_size, {}

  def linear(name, n_in, n_out):
    p[name + '.weight'] = ((n_out, n_in), ('normal', initializer_range))
    p[name + '.bias'] = ((n_out,), ('zeros',))

  def conv1d(name, c_in, c_out, kernel_size, groups):
    bound = 1.0 / math.sqrt(c_in // groups * kernel_size)  # kaiming_uniform_(a=sqrt(5)) and the bias rule
    p[name + '.weight'] = ((c_out, c_in // groups, kernel_size), ('uniform', bound))
    p[name + '.bias'] = ((c_out,), ('uniform', bound))

  width = 2 * f.num_positions_each_dir + 1 if hasattr(f, 'num_positions_each_dir') else None
  if f.convfixed:
    p['convfixed_param'] = ((1, f.num_heads, 1, width), ('zeros',))
  for name, on in (('convq_param', f.convq), ('convk_param', f.convk)):
    if on:  # kaiming_uniform_(a=sqrt(5)) on (head_size, width): fan_in = width
      p[name] = ((f.head_size, width), ('uniform', 1.0 / math.sqrt(width)))
  if f.use_lightweight_conv:
    r = np.arange(seq_length)
    p['relative_positions_mat'] = (
        (1, 1, seq_length, seq_length),
        ('buffer', (np.clip(r[None, :] - r[:, None], -f.num_positions_each_dir, f.num_positions_each_dir)
                    + f.num_positions_each_dir)[None, None]))
  if f.use_convolution:
    conv1d('convolution', d, f.all_head_size, width, d)
    p['convolution_scalar'] = ((1, f.num_heads, 1, 1), ('ones',))
  if f.qk_name == 'none':
    pass
  elif f.qk_conv is not None:
    c = f.qk_conv
    for name in ('query', 'key'):
      if c['mixed']:
        linear(name + '_linear', d, c['total_out_size'])
      if c['depth']:
        linear(name + '_pointwise', c['conv_out_size'], c['total_out_size'])
      conv1d(name + '_conv', d, c['conv_out_size'], 2 * c['r'] + 1, c['groups'])
  else:
    linear('query', d, f.all_head_size)
    linear('key', d, f.all_head_size)
  if f.value_conv is not None:
    c = f.value_conv
    if c['mixed']:
      linear('value_linear', d, c['total_out_size'])
    if c['depth']:
      linear('value_pointwise', c['conv_out_size'], c['total_out_size'])
    conv1d('value_conv', d, c['conv_out_size'], 2 * c['r'] + 1, c['groups'])
  else:
    linear('value', d, f.all_head_size)
  return p


def random_state(f: Flags, seq_length, seed=0, scale=0.2):
  """Their state dict (self.* and output.dense.*) with every trained parameter drawn N(0, scale^2)."""
  rng = np.random.default_rng(seed)
  state = {}
  for name, (shape, init) in parameters(f, seq_length).items():
    if init[0] == 'buffer':
      state['self.' + name] = init[1]
    elif name == 'convolution_scalar' and not f.convolution_scaled:  # requires_grad=False: stays at 1
      state['self.' + name] = np.ones(shape)
    else:
      state['self.' + name] = scale * rng.standard_normal(shape)
  state['output.dense.weight'] = scale * rng.standard_normal((f.hidden_size, f.all_head_size))
  state['output.dense.bias'] = scale * rng.standard_normal(f.hidden_size)
  return state


# ---- forward ----------------------------------------------------------------------------------------------

def _linear(state, name, x):
  return x @ state[name + '.weight'].T + state[name + '.bias']


def _conv1d(state, name, x_BxCxL, groups):
  """torch.nn.Conv1d(stride=1, padding=(K-1)/2) on batch x channels x length: a cross-correlation."""
  w, b = state[name + '.weight'], state[name + '.bias']
  c_out, c_in_g, k = w.shape
  pad = (k - 1) // 2
  bsz, _, length = x_BxCxL.shape
  xp = np.pad(x_BxCxL, ((0, 0), (0, 0), (pad, pad)))
  out_g = c_out // groups
  y = np.zeros((bsz, c_out, length)) + b[None, :, None]
  for o in range(c_out):
    g = o // out_g
    xs = xp[:, g * c_in_g:(g + 1) * c_in_g]  # batch x in/groups x (length + 2 pad)
    for t in range(k):
      y[:, o] += np.einsum('bcl,c->bl', xs[:, :, t:t + length], w[o, :, t])
  return y


def _gelu(x):
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _transpose_for_scores(f, x):
  return x.reshape(x.shape[:-1] + (f.num_heads, f.head_size)).transpose(0, 2, 1, 3)


def _project(f, state, name, conv, hidden_states):
  """Their 'Project queries/keys/values' blocks for a convolution setting."""
  convolved = _conv1d(state, f'self.{name}_conv', hidden_states.transpose(0, 2, 1), conv['groups'])
  mixed = convolved.transpose(0, 2, 1)
  if conv['depth']:
    if conv['act']:
      mixed = _gelu(mixed)
    mixed = _linear(state, f'self.{name}_pointwise', mixed)
  if conv['mixed']:
    mixed = np.concatenate([mixed, _linear(state, f'self.{name}_linear', hidden_states)], axis=-1)
  return mixed


def forward(f: Flags, state, hidden_states, mask_BxL):
  """Their BertSelfAttention.forward (eval mode: no dropout, no head mask) then BertSelfOutput.dense."""
  hidden_states = np.asarray(hidden_states, np.float64)
  seq_length = hidden_states.shape[1]
  # BertModel.get_extended_attention_mask: batch x 1 x 1 x seq_len, 0 or -10000.
  attention_mask = (1.0 - mask_BxL[:, None, None, :].astype(np.float64)) * -10000.0
  if f.value_name[0:11] == 'convolution' or f.qk_name[0:11] == 'convolution':
    should_mask = attention_mask.reshape(-1, seq_length, 1) < -1.0
    hidden_states = np.where(should_mask, 0.0, hidden_states)

  def layer(name, conv):
    if conv is not None:
      return _project(f, state, name, conv, hidden_states)
    if f'self.{name}.weight' in state:
      return _linear(state, f'self.{name}', hidden_states)
    return hidden_states  # their query/key is None (remove_qk)

  mixed_query_layer = layer('query', f.qk_conv)
  mixed_key_layer = layer('key', f.qk_conv)
  mixed_value_layer = layer('value', f.value_conv)
  query_layer = _transpose_for_scores(f, mixed_query_layer)
  key_layer = _transpose_for_scores(f, mixed_key_layer)
  value_layer = _transpose_for_scores(f, mixed_value_layer)

  bsz = hidden_states.shape[0]
  if f.use_lightweight_conv:
    if f.use_qk:
      attention_scores = query_layer @ key_layer.transpose(0, 1, 3, 2) / math.sqrt(f.head_size)
    else:
      attention_scores = np.zeros((bsz, f.num_heads, seq_length, seq_length))
    index = np.broadcast_to(state['self.relative_positions_mat'], (bsz, f.num_heads, seq_length, seq_length))
    query_relative_weights = np.zeros((1, 1, 1, 1))
    if f.convfixed:
      query_relative_weights = state['self.convfixed_param'] + np.zeros((bsz, f.num_heads, seq_length, 1))
    if f.convq:
      weights_to_add = np.einsum('dr,bhsd->bhsr', state['self.convq_param'], query_layer)
      query_relative_weights = query_relative_weights + weights_to_add / math.sqrt(f.head_size)
    if query_relative_weights.shape[-1] != 1:
      # torch.gather(input, dim=3, index)[b, h, s, t] = input[b, h, s, index[b, h, s, t]]
      attention_scores = attention_scores + np.take_along_axis(
          np.broadcast_to(query_relative_weights, (bsz, f.num_heads, seq_length,
                                                   query_relative_weights.shape[-1])), index, axis=3)
    key_relative_weights = np.zeros((1, 1, 1, 1))
    if f.convk:
      weights_to_add = np.einsum('dr,bhsd->bhsr', state['self.convk_param'], key_layer)
      key_relative_weights = key_relative_weights + weights_to_add / math.sqrt(f.head_size)
    if key_relative_weights.shape[-1] != 1:
      # Gathered as for queries, then the last two indices permuted.
      attention_scores = attention_scores + np.take_along_axis(key_relative_weights, index, axis=3).transpose(
          0, 1, 3, 2)
  else:
    attention_scores = query_layer @ key_layer.transpose(0, 1, 3, 2) / math.sqrt(f.head_size)

  attention_scores = attention_scores + attention_mask
  e = np.exp(attention_scores - attention_scores.max(-1, keepdims=True))
  attention_probs = e / e.sum(-1, keepdims=True)
  context_layer = attention_probs @ value_layer

  if f.use_convolution:
    should_mask = attention_mask.reshape(-1, seq_length, 1) < -1.0
    mixed_value_layer = np.where(should_mask, 0.0, mixed_value_layer)
    convolved = _conv1d(state, 'self.convolution', mixed_value_layer.transpose(0, 2, 1), f.hidden_size)
    convolved = _transpose_for_scores(f, convolved.transpose(0, 2, 1))
    context_layer = context_layer + convolved * state['self.convolution_scalar']

  context_layer = context_layer.transpose(0, 2, 1, 3).reshape(bsz, seq_length, f.all_head_size)
  return _linear(state, 'output.dense', context_layer)
