"""Reading and writing Hugging Face checkpoint directories without torch (safetensors), and a table-driven
mapping between HF state-dict keys and posjax parameter paths.

A mapping entry says how one HF tensor becomes one posjax parameter:
- `Linear(n_in)`: a torch Linear weight [out, in] -> kernel of shape (in dims..., out dims...), where the first
  `n_in` dims of the posjax kernel are the input ones (q/k/v kernels are (D, H, Dh), the output one (H, Dh, D));
- `Bias`: a Linear bias [out] <-> the posjax bias of the output dims (split per head for q/k/v);
- `Copy`: same values and shape (embeddings, LayerNorm, position tables);
- `Conv`: a torch Conv1d weight [out, in/groups, K] -> kernel (K, [in/groups,] out dims...);
- `Reshape`: same values, reshaped to the posjax shape and back to `shape`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any

import numpy as np

from posjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Linear:
  n_in: int = 1


@dataclasses.dataclass(frozen=True)
class Copy:
  pass


@dataclasses.dataclass(frozen=True)
class Bias:
  """A torch Linear bias [out] <-> a posjax bias of the output dims (e.g. (H, Dh))."""


@dataclasses.dataclass(frozen=True)
class Conv:
  """A torch Conv1d weight [out, in/groups, K] <-> (K, in/groups, out dims...), or (K, out dims...) when
  depthwise (in/groups = 1)."""
  depthwise: bool = False


@dataclasses.dataclass(frozen=True)
class Reshape:
  shape: tuple[int, ...]  # the other side's shape


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple[str, ...]  # posjax parameter path
  key: str  # HF state-dict key
  kind: Any = Copy()
  optional: bool = False  # absent from some HF architectures (e.g. the pooler of *ForMaskedLM)


def to_posjax(value: np.ndarray, kind, shape: tuple[int, ...]) -> np.ndarray:
  if isinstance(kind, Linear):
    value = value.T
  elif isinstance(kind, Conv):
    lead = (shape[0], 1) if kind.depthwise else tuple(shape[:2])
    if value.ndim != 3 or value.shape[:0:-1] != lead:
      raise ValueError(f'a Conv1d weight of width {lead[0]} and {lead[1]} input channels per group is needed')
    value = value.transpose(2, 1, 0)
  if math.prod(value.shape) != math.prod(shape):
    raise ValueError(f'shape {value.shape} cannot become {shape}')
  return np.ascontiguousarray(value.reshape(shape))


def to_hf(value: np.ndarray, kind) -> np.ndarray:
  if isinstance(kind, Linear):
    n_in = kind.n_in
    value = value.reshape(math.prod(value.shape[:n_in]), -1).T
  elif isinstance(kind, Bias):
    value = value.reshape(-1)
  elif isinstance(kind, Conv):
    value = value.reshape(value.shape[0], 1 if kind.depthwise else value.shape[1], -1).transpose(2, 1, 0)
  elif isinstance(kind, Reshape):
    value = value.reshape(kind.shape)
  return np.ascontiguousarray(value)


def check_exportable(cfg, model: str, *, factorised: bool, shared_layers: bool, ffn_groups: bool,
                     mlm_head_act: str) -> None:
  """Refuses (ConfigError) the posjax model fields a Hugging Face `model` has no counterpart for; the
  attention variant is each exporter's own check."""
  problems = []
  if not cfg.option('use_qk', True):
    problems.append('attention option use_qk=False')
  if cfg.embedding_size and not factorised:
    problems.append(f'model.embedding_size={cfg.embedding_size} (factorised embeddings)')
  if (cfg.layer_groups or cfg.inner_group_size != 1) and not shared_layers:
    problems.append(f'model.layer_groups={cfg.layer_groups} (shared layers)')
  if cfg.ffn_groups != 1 and not ffn_groups:
    problems.append(f'model.ffn_groups={cfg.ffn_groups} (grouped feed-forward)')
  if cfg.mlm_head and (cfg.mlm_head_act or cfg.hidden_act) != mlm_head_act:
    problems.append(f'an MLM head with {cfg.mlm_head_act or cfg.hidden_act} (transformers uses {mlm_head_act})')
  if problems:
    raise ConfigError(f'{"; ".join(problems)}: no Hugging Face {model} equivalent')


def linear(path, key, n_in=1, optional=False) -> list[Entry]:
  """A torch Linear `key` (.weight, .bias) -> posjax dense params at `path` (kernel, bias)."""
  return [Entry(path + ('kernel',), key + '.weight', Linear(n_in), optional),
          Entry(path + ('bias',), key + '.bias', Bias(), optional)]


def norm(path, key, optional=False) -> list[Entry]:
  """A torch LayerNorm `key` -> posjax LayerNorm params at `path` (scale, bias)."""
  return [Entry(path + ('scale',), key + '.weight', optional=optional),
          Entry(path + ('bias',), key + '.bias', optional=optional)]


def optional(entries: list[Entry], prefixes: tuple[str, ...]) -> list[Entry]:
  """The same entries, with those whose HF key starts with one of `prefixes` made optional."""
  return [dataclasses.replace(e, optional=True) if e.key.startswith(prefixes) else e for e in entries]


def init_params(model, seed: int = 0, seq_len: int = 8):
  """Fresh NumPy params of a posjax model: the shapes a checkpoint must fill, and the values of weights it
  legitimately lacks."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ids = jnp.zeros((1, seq_len), jnp.int32)
  # An RBG key: XLA compiles its sampler ~2.5x faster on CPU than threefry's, and only the weights a
  # checkpoint lacks (e.g. the pooler) keep these values.
  variables = jax.jit(model.init)(jax.random.key(seed, impl='rbg'), ids)
  return jax.tree_util.tree_map(np.asarray, nn.unbox(variables['params']))


def import_checkpoint(directory: str, table: list[Entry], template, state=None, ignore: tuple[str, ...] = (),
                      what: str = 'posjax'):
  """Params from HF checkpoint `directory` through `table`; warns naming optional weights it lacks and HF
  weights nothing used; errors (ConfigError) name any required weight that is missing or mis-shaped."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  state = read_state(directory) if state is None else state
  params, missing, unused = apply_entries(table, state, template, directory, ignore)
  if missing:
    logging.warning('%s does not hold %s; those keep a fresh initialisation', directory, ', '.join(missing))
  if unused:
    logging.warning('%s: weights not used by %s: %s', directory, what, ', '.join(unused))
  return params


# config.json's fields that every BERT-family model (BERT, ALBERT, ELECTRA, ConvBERT) has, and the ModelConfig
# field each one is.
SHARED_FIELDS = {
    'vocab_size': 'vocab_size', 'hidden_size': 'hidden_size', 'num_hidden_layers': 'num_layers',
    'num_attention_heads': 'num_heads', 'intermediate_size': 'intermediate_size',
    'max_position_embeddings': 'max_position_embeddings', 'type_vocab_size': 'type_vocab_size',
    'hidden_dropout_prob': 'hidden_dropout', 'attention_probs_dropout_prob': 'attention_dropout',
    'layer_norm_eps': 'layer_norm_eps', 'hidden_act': 'hidden_act', 'initializer_range': 'initializer_range',
}


def shared_from_hf(hfc: dict) -> dict[str, Any]:
  """The ModelConfig fields a config.json's shared fields give (a missing one is a KeyError, which the
  loaders turn into an error naming it)."""
  return {ours: hfc[theirs] for theirs, ours in SHARED_FIELDS.items()} | {'pad_token_id': hfc.get('pad_token_id') or 0}


def shared_to_hf(cfg) -> dict[str, Any]:
  """config.json's shared fields of a ModelConfig (embeddings tied to the output layer, as posjax's are)."""
  return {theirs: getattr(cfg, ours) for theirs, ours in SHARED_FIELDS.items()} | {
      'pad_token_id': cfg.pad_token_id, 'tie_word_embeddings': True}


def read_config(directory: str) -> dict:
  path = os.path.join(directory, 'config.json')
  if not os.path.isdir(directory):
    raise ConfigError(f'Hugging Face checkpoint {directory!r} is not a directory')
  if not os.path.exists(path):
    raise ConfigError(f'Hugging Face checkpoint {directory!r} has no config.json')
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f'{path}: not valid JSON ({e})') from None


def read_state(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory as float32/int NumPy arrays.

  safetensors (single or sharded) are read with `safetensors.numpy`; a `pytorch_model.bin` only through
  `torch.load(weights_only=True)`, which refuses to unpickle anything but tensors.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(directory, '*.safetensors')))
  if files:
    state = {}
    for f in files:
      try:
        state.update(load_file(f))
      except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own error kinds)
        raise ConfigError(f'{f}: not a readable safetensors file ({type(e).__name__}: {str(e)[:160]})') from None
    return {k: v.astype(np.float32) if v.dtype.kind == 'f' else v for k, v in state.items()}
  binary = os.path.join(directory, 'pytorch_model.bin')
  if os.path.exists(binary):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError(f'{binary}: reading .bin checkpoints needs torch; convert it to safetensors or '
                        'install torch') from None
    try:
      state = torch.load(binary, map_location='cpu', weights_only=True)
    except Exception as e:  # pylint: disable=broad-except  (a damaged file, or one holding more than tensors)
      raise ConfigError(f'{binary}: not a readable tensors-only PyTorch checkpoint ({type(e).__name__}: '
                        f'{str(e).splitlines()[0][:160] if str(e) else ""})') from None
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
  raise ConfigError(f'Hugging Face checkpoint {directory!r} has no *.safetensors or pytorch_model.bin')


def write(directory: str, config: dict, state: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def apply_entries(entries: list[Entry], state: dict[str, np.ndarray], template, source: str,
                  ignore: tuple[str, ...] = ()):
  """posjax params shaped like `template` (freshly initialised params) filled from `state`.

  Every required entry must be present with a compatible shape and every template leaf must be covered, or a
  ConfigError names the parameter; optional entries absent from `state` keep the template's value. Returns
  (params, missing optional keys, unused HF keys other than `ignore`).
  """
  params, missing_optional = {}, []
  covered = set()
  for e in entries:
    try:
      leaf = _get(template, e.path)
    except KeyError:
      raise ConfigError(f'{source}: posjax model has no parameter {"/".join(e.path)} for {e.key}') from None
    covered.add(e.path)
    if e.key not in state:
      if e.optional:
        missing_optional.append(e.key)
        _set(params, e.path, np.asarray(leaf))
        continue
      raise ConfigError(f'{source}: missing weight {e.key!r} (for posjax {"/".join(e.path)})')
    try:
      value = to_posjax(np.asarray(state[e.key]), e.kind, tuple(leaf.shape))
    except ValueError as err:
      raise ConfigError(f'{source}: weight {e.key!r} has shape {tuple(state[e.key].shape)}, posjax '
                        f'{"/".join(e.path)} needs {tuple(leaf.shape)} ({err})') from None
    _set(params, e.path, value.astype(leaf.dtype))
  leaves = _paths(template)
  uncovered = sorted('/'.join(p) for p in leaves if p not in covered)
  if uncovered:
    raise ConfigError(f'{source}: no Hugging Face weight maps to posjax parameter(s) {", ".join(uncovered)}')
  used = {e.key for e in entries}
  unused = sorted(k for k in state if k not in used and k not in ignore)
  return params, missing_optional, unused


def _paths(tree, prefix=()):
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    out = []
    for k, v in tree.items():
      out.extend(_paths(v, prefix + (k,)))
    return out
  return [prefix]


def extract(entries: list[Entry], params) -> dict[str, np.ndarray]:
  return {e.key: to_hf(np.asarray(_get(params, e.path), np.float32), e.kind) for e in entries}
