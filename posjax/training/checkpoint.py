"""Orbax checkpoints of the train state plus a JSON record of the model config they belong to."""

from __future__ import annotations

import os

from absl import logging
import flax.linen as nn
import grain
import jax
import orbax.checkpoint as ocp

from posjax.errors import ConfigError


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


# The key of `meta` that holds the grain iterator of the training data: saved as its own item 'data' (each
# process's iterator state), not as JSON metadata.
DATA_ITERATOR = 'data_iterator'


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  meta = dict(meta)
  items = dict(state=ocp.args.StandardSave(state))
  if meta.get(DATA_ITERATOR) is not None:
    items['data'] = grain.checkpoint.CheckpointSave(meta.pop(DATA_ITERATOR))
  mngr.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items))


def check_compatible(saved_model: dict, model: dict, workdir: str) -> None:
  """A workdir's checkpoint must be of the configured model: never silently re-initialise."""
  diff = {k: (saved_model.get(k), v) for k, v in model.items() if saved_model.get(k) != v}
  if diff:
    fields = ', '.join(f'model.{k}: checkpoint {a!r} vs config {b!r}' for k, (a, b) in sorted(diff.items()))
    raise ConfigError(f'workdir {workdir!r} holds a checkpoint of a different model ({fields}); use a new '
                      'workdir or the same config')


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, model: dict, workdir: str, data=None):
  """(state, meta) from the latest readable checkpoint, or (None, None) when there is none; `data`, a grain
  iterator, is set to the state saved with it.

  Orbax only finalises a checkpoint directory once it is complete, so a save cut off midway is never listed;
  a finalised one that was damaged afterwards (truncated or deleted files) is skipped with a warning and the
  previous one is used.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  for step in steps:
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # pylint: disable=broad-except  (any unreadable file means: try the previous one)
      logging.warning('checkpoint at step %d in %s is unreadable (%s: %s); trying the previous one', step,
                      workdir, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '')
      continue
    check_compatible(meta['model'], model, workdir)
    try:
      items = dict(state=ocp.args.StandardRestore(abstract_state))
      # grain saves one state per process: a checkpoint of older code, or of another number of processes,
      # has none for this one.
      mine = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
      if data is not None and os.path.exists(os.path.join(mngr.directory, str(step), 'data', mine)):
        items['data'] = grain.checkpoint.CheckpointRestore(data)
      elif data is not None:
        logging.warning('the checkpoint at step %d holds no data iterator state for %s; the data starts '
                        'afresh', step, mine)
      restored = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('checkpoint at step %d in %s is unreadable (%s: %s); trying the previous one', step,
                      workdir, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '')
      continue
    return restored['state'], meta
  if steps:
    raise ConfigError(f'workdir {workdir!r}: none of its checkpoints ({", ".join(map(str, steps))}) can be '
                      'read; move them away to start afresh')
  return None, None


def abstract_with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs with their target shardings, logical-axis boxes removed (for StandardRestore)."""
  plain = jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
                                 abstract_state, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), plain, shardings)
