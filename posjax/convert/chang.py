"""The authors' code of Chang et al. 2021 (mlpc-ucsd/BERT_Convolutions, `modeling_bert.py`) <-> posjax attention.

Their `BertAttention` holds `self` (their `BertSelfAttention`: q/k/v projections or convolutions, the composite
terms, the convolution of values) and `output.dense` (the output projection); posjax's `MultiHeadAttention`
holds the same computation, so one of their layers' attention weights map onto it:

    settings = chang.attention_settings(attention_kernel='qk_convfixed_convq_convk 8',
                                        qk='convolution_depth_mixed_no_act 4 1', remove_position_embeddings=True)
    cfg = posjax.ModelConfig.from_dict(dict(hidden_size=768, num_heads=12, **settings))
    params = chang.import_attention(cfg, state)   # state: {'self.query_conv.weight': array, ...}

`state` holds NumPy arrays under their names, e.g. `model.bert.encoder.layer[3].attention.state_dict()`
converted with `.numpy()` (or a whole model's state with `prefix='bert.encoder.layer.3.attention.'`).
`output.LayerNorm` belongs to posjax's layer (`attention_norm`), not to the attention, and is ignored here.
Their tables and kernels keep their orientation (posjax.attention.composite indexes `convk` by i - j, as they
do), so nothing is flipped. `export_attention` writes posjax parameters back in their layout.

What their code can express and posjax cannot, or the other way round, is a ConfigError: their `convbert`
kernel (posjax's `convbert` is Jiang et al.'s own form), different convolution settings for q/k and for v
(posjax's `convqkv` has one), and any posjax term their code lacks (TISA, T5, RoPE, ...).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from posjax.attention import registry
from posjax.config import ModelConfig
from posjax.convert import hf
from posjax.convert.hf import Entry
from posjax.errors import ConfigError

_TARGETS = (('q', 'query'), ('k', 'key'), ('v', 'value'))
_THEIR_TERMS = ('convfixed', 'convq', 'convk')


def _convolution(spec: str, flag: str) -> dict:
  """Their `convolution[_depth][_mixed][_no_act] R G` (for `flag`) -> posjax's convqkv options."""
  parts = spec.split()
  if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
    raise ConfigError(f'--{flag} {spec!r}: expected "convolution[_depth][_mixed][_no_act] R G" (R taps each '
                      'way, G groups)')
  separable = 'depth' in parts[0]
  return {'convqkv_kernel_size': 2 * int(parts[1]) + 1, 'convqkv_separable': separable,
          'convqkv_groups': 1 if separable else int(parts[2]), 'convqkv_mixed': 'mixed' in parts[0],
          # Their activation sits between the depthwise and pointwise parts only.
          'convqkv_activation': separable and 'no_act' not in parts[0]}


def attention_settings(attention_kernel: str = 'dot_product', qk: str = 'linear',
                       value_forward: str = 'feedforward', remove_qk: bool = False,
                       remove_position_embeddings: bool = False) -> dict:
  """Their model flags -> {'attention': a posjax variant, 'attention_options': dict} for ModelConfig, read as
  their BertSelfAttention reads them (by substring)."""
  if attention_kernel == 'convbert':
    raise ConfigError("their attention_kernel 'convbert' has no posjax counterpart in this form (posjax's "
                      "convbert follows Jiang et al.'s own code)")
  parts = attention_kernel.split()
  name = parts[0] if parts else ''
  terms = [t for t in _THEIR_TERMS if t in name]
  components = ['none' if remove_position_embeddings else 'absolute'] + terms
  opts = {}
  if terms or 'convolution' in name:
    if len(parts) != 2 or not parts[1].isdigit():
      raise ConfigError(f'--attention_kernel {attention_kernel!r}: expected "<terms> k" with k taps each way')
    k = int(parts[1])
  if terms:
    opts['composite_kernel_size'] = 2 * k + 1
    # Without convfixed/convq/convk their scores are q.k whatever the name says.
    opts['use_qk'] = 'qk' in name or 'dot' in name
  qk = 'none' if remove_qk else qk
  conv = {}
  if qk.startswith('convolution'):
    conv['qk'] = _convolution(qk, 'qk')
  if value_forward.startswith('convolution'):
    conv['v'] = _convolution(value_forward, 'value_forward')
  if len(conv) == 2 and conv['qk'] != conv['v']:
    raise ConfigError(f'--qk {qk!r} and --value_forward {value_forward!r} differ; posjax\'s convqkv has one '
                      'setting for all of its targets')
  if conv:
    components.append('convqkv')
    opts.update(next(iter(conv.values())))
    opts['convqkv_targets'] = ''.join(t for t in ('qk', 'v') if t in conv)
  if 'convolution' in name:
    components.append('convvalues')
    opts['convvalues_kernel_size'] = 2 * k + 1
    opts['convvalues_scale'] = 'convolution_scaled' in name
  return {'attention': '+'.join(components), 'attention_options': opts}


def _check_variant(cfg: ModelConfig, remove_qk: bool):
  plan = registry.parse(cfg.attention)
  extra = [c.name for c in plan.score if c.name not in _THEIR_TERMS] + [c.name for c in plan.qkv + plan.heads]
  extra += [c.name for c in plan.output if c.name != 'convvalues']
  if extra:
    raise ConfigError(f'attention variant {cfg.attention!r}: {", ".join(extra)} not in the authors\' '
                      'BertSelfAttention (they have convfixed, convq, convk, convqkv and convvalues)')
  targets = cfg.option('convqkv_targets') if plan.projection else ''
  if remove_qk and set('qk') & set(targets):
    raise ConfigError('remove_qk: their --remove_qk drops the query and key projections, but '
                      f'convqkv_targets={targets!r} convolves them')
  return plan, targets


def attention_entries(cfg: ModelConfig, path: tuple[str, ...] = (), prefix: str = '') -> list[Entry]:
  """The table between their BertAttention at `prefix` and posjax's MultiHeadAttention params at `path`."""
  plan, targets = _check_variant(cfg, False)
  s = prefix + 'self.'
  e = []
  for t, name in _TARGETS:
    if t not in targets:
      e += hf.linear(path + (name,), s + name)
      continue
    ours = path + ('convqkv', name)
    if cfg.option('convqkv_separable'):
      e += [Entry(ours + ('depthwise',), s + f'{name}_conv.weight', hf.Conv(depthwise=True)),
            Entry(ours + ('depthwise_bias',), s + f'{name}_conv.bias', hf.Bias())]
      e += hf.linear(ours + ('pointwise',), s + f'{name}_pointwise')
    else:
      e += [Entry(ours + ('kernel',), s + f'{name}_conv.weight', hf.Conv()),
            Entry(ours + ('bias',), s + f'{name}_conv.bias', hf.Bias())]
    if cfg.option('convqkv_mixed'):
      e += hf.linear(path + (name,), s + f'{name}_linear')
  width = cfg.option('composite_kernel_size')
  for c in plan.score:
    if c.name == 'convfixed':  # theirs 1xHx1x(2k+1)
      e.append(Entry(path + ('convfixed', 'kernel'), s + 'convfixed_param',
                     hf.Reshape((1, cfg.num_heads, 1, width))))
    else:  # theirs Dhx(2k+1), transposed like a Linear weight
      e.append(Entry(path + (c.name, 'kernel'), s + f'{c.name}_param', hf.Linear()))
  if plan.output:
    e += [Entry(path + ('convvalues', 'kernel'), s + 'convolution.weight', hf.Conv(depthwise=True)),
          Entry(path + ('convvalues', 'bias'), s + 'convolution.bias', hf.Bias())]
    if cfg.option('convvalues_scale'):
      e.append(Entry(path + ('convvalues', 'scale'), s + 'convolution_scalar',
                     hf.Reshape((1, cfg.num_heads, 1, 1))))
  return e + hf.linear(path + ('out',), prefix + 'output.dense', n_in=2)


def _template(cfg: ModelConfig):
  from posjax.attention import MultiHeadAttention  # pylint: disable=g-import-not-at-top
  x, mask = jnp.zeros((1, 8, cfg.hidden_size), cfg.dtype), jnp.ones((1, 8), bool)
  return nn.unbox(jax.eval_shape(MultiHeadAttention(cfg).init, jax.random.PRNGKey(0), x, mask)['params'])


def import_attention(cfg: ModelConfig, state, prefix: str = '', remove_qk: bool = False) -> dict:
  """posjax MultiHeadAttention params for `cfg` from the state dict of their BertAttention at `prefix`.

  `remove_qk`: their model ran with --remove_qk, which makes the queries and keys the hidden states
  themselves; posjax's query and key projections become the identity (and, unlike theirs, stay trainable).
  Errors (ConfigError) name a missing or mis-shaped weight, or a posjax parameter nothing maps to."""
  plan, _ = _check_variant(cfg, remove_qk)
  state = {k: np.asarray(v) for k, v in state.items()}
  s = prefix + 'self.'
  if remove_qk:
    for name in ('query', 'key'):
      if s + f'{name}.weight' in state:
        raise ConfigError(f'remove_qk=True, but the state dict holds {s}{name}.weight')
      state[s + f'{name}.weight'] = np.eye(cfg.hidden_size, dtype=np.float32)
      state[s + f'{name}.bias'] = np.zeros(cfg.hidden_size, np.float32)
  scalar = state.get(s + 'convolution_scalar')
  if plan.output and not cfg.option('convvalues_scale') and scalar is not None and np.any(scalar != 1.0):
    raise ConfigError(f'{s}convolution_scalar is not 1 (their "convolution_scaled"); set the attention option '
                      'convvalues_scale=True')
  ignore = (s + 'relative_positions_mat', s + 'convolution_scalar', prefix + 'output.LayerNorm.weight',
            prefix + 'output.LayerNorm.bias')
  params, _, unused = hf.apply_entries(attention_entries(cfg, (), prefix), state, _template(cfg),
                                       "the authors' state dict", ignore)
  if unused:
    raise ConfigError(f"the authors' state dict holds weights posjax's {cfg.attention!r} does not use: "
                      f'{", ".join(unused)}')
  return params


def export_attention(cfg: ModelConfig, params, prefix: str = '') -> dict[str, np.ndarray]:
  """Their BertAttention state dict at `prefix` (less output.LayerNorm) from posjax MultiHeadAttention
  params, with the buffers their module registers as parameters (relative positions, a fixed scale)."""
  plan, _ = _check_variant(cfg, False)
  state = hf.extract(attention_entries(cfg, (), prefix), jax.device_get(nn.unbox(params)))
  s = prefix + 'self.'
  if plan.score:
    k = (cfg.option('composite_kernel_size') - 1) // 2
    pos = np.arange(cfg.max_position_embeddings)
    state[s + 'relative_positions_mat'] = (np.clip(pos[None, :] - pos[:, None], -k, k) + k)[None, None]
  if plan.output and not cfg.option('convvalues_scale'):
    state[s + 'convolution_scalar'] = np.ones((1, cfg.num_heads, 1, 1), np.float32)
  return state
