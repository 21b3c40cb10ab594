"""Converting parameters between the unrolled encoder layout (`encoder/layer_{k}`, what the Hugging Face
converters read and write) and the scanned one (`encoder/layers/block/layer_{j}` with a leading axis over
the layer groups), so `model.scan_layers` stays a training-time choice: the same numbers either way."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from posjax.config import ModelConfig
from posjax.errors import ConfigError
from posjax.models.bert import layer_groups


def _encoders(tree, path=()):
  """Paths of every encoder's parameter dict in a (possibly nested: ELECTRA) params tree."""
  if not hasattr(tree, 'items'):
    return
  for k, v in tree.items():
    if k == 'encoder' and hasattr(v, 'items'):
      yield path + (k,)
    else:
      yield from _encoders(v, path + (k,))


def _replace(tree, path, value):
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _replace(tree[path[0]], path[1:], value)
  return out


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _stack_leaves(trees):
  stack = jnp.stack if any(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(trees[0])) else np.stack
  return jax.tree_util.tree_map(lambda *xs: stack(xs), *trees)


def stack_layers(cfg: ModelConfig, params) -> Any:
  """Unrolled params (scan_layers=False) -> scanned params for `dataclasses.replace(cfg, scan_layers=True)`.

  ELECTRA's generator scales the discriminator's width, not its depth, so one cfg serves both encoders."""
  groups, _, inner = layer_groups(cfg)
  for path in list(_encoders(params)):
    enc = _get(params, path)
    names = [f'layer_{k}' for k in range(groups * inner)]
    if sorted(enc) != sorted(names):
      raise ConfigError(f'{"/".join(path)}: expected unrolled layers {", ".join(names)}; found '
                        f'{", ".join(sorted(enc))} (already scanned?)')
    block = {f'layer_{j}': _stack_leaves([enc[f'layer_{g * inner + j}'] for g in range(groups)])
             for j in range(inner)}
    params = _replace(params, path, {'layers': {'block': block}})
  return params


def unstack_layers(cfg: ModelConfig, params) -> Any:
  """Scanned params -> unrolled ones (the inverse of `stack_layers`)."""
  groups, _, inner = layer_groups(cfg)
  for path in list(_encoders(params)):
    enc = _get(params, path)
    if sorted(enc) != ['layers']:
      raise ConfigError(f'{"/".join(path)}: expected scanned layers (encoder/layers); found '
                        f'{", ".join(sorted(enc))} (already unrolled?)')
    block = enc['layers']['block']
    unrolled = {f'layer_{g * inner + j}': jax.tree_util.tree_map(lambda x, g=g: x[g], block[f'layer_{j}'])
                for g in range(groups) for j in range(inner)}
    params = _replace(params, path, unrolled)
  return params


def unrolled(cfg: ModelConfig, params) -> tuple[ModelConfig, Any]:
  """(cfg, params) in the unrolled layout whatever `cfg.scan_layers` says (what the converters write)."""
  if not cfg.scan_layers:
    return cfg, params
  return dataclasses.replace(cfg, scan_layers=False), unstack_layers(cfg, params)
