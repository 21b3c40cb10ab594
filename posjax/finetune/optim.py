"""Fine-tuning's layer-wise learning-rate decay, as multipliers for `training.optimizer.make(config, lr, scales)`.

Layer-wise decay (Clark et al. 2020, ELECTRA's fine-tuning): the learning rate of a parameter at depth d is
lr * decay^(N + 1 - d), with the embeddings at depth 0, encoder layer i at depth i + 1 and the pooler and
classifier at N + 1 (N layers). Scaling the whole AdamW update is the same as scaling its learning rate, since
decoupled weight decay is multiplied by the learning rate too.
"""

from __future__ import annotations

import re

import jax


def depth(path: tuple[str, ...], num_layers: int, layer_groups: int = 0, inner_group_size: int = 1) -> int:
  if path[0] != 'bert' or path[1] not in ('embeddings', 'embedding_projection', 'encoder'):
    return num_layers + 1  # pooler and the classification head
  if path[1] != 'encoder':
    return 0
  k = int(re.fullmatch(r'layer_(\d+)', path[2]).group(1))
  if layer_groups:
    # ALBERT: a shared layer is used from its group's first step to its last; it gets its last (top) depth.
    per_group = num_layers // layer_groups
    return (k // inner_group_size + 1) * per_group
  return k + 1


def layer_scales(params, cfg, decay: float):
  """A tree like `params` of learning-rate multipliers."""
  def scale(path, _):
    names = tuple(getattr(p, 'key', str(p)) for p in path)
    return decay ** (cfg.num_layers + 1 - depth(names, cfg.num_layers, cfg.layer_groups, cfg.inner_group_size))
  return jax.tree_util.tree_map_with_path(scale, params)
