"""Orbax checkpoints of the train state plus a JSON record of the model config they belong to and of a checksum
of every leaf of the state, so a checkpoint damaged after it was written is never silently resumed from."""

from __future__ import annotations

import os

from absl import logging
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from posjax.errors import ConfigError


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def _leaf_checksum(x):
  """sum(bits[i] * (2i+1)) mod 2^32 over the leaf's raw bits: any single flipped bit or swapped pair of
  values changes it. Computed on the devices, so a sharded leaf is never gathered to one host."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize in (1, 2):
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * x.dtype.itemsize}')).astype(jnp.uint32)
  else:  # 8-byte values: two 32-bit words each
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  odd = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape) * jnp.uint32(2) + jnp.uint32(1)
  return jnp.sum(bits * odd, dtype=jnp.uint32)


@jax.jit
def _checksums(state):
  return jax.tree.map(_leaf_checksum, state)


def checksums(state) -> dict[str, int]:
  """{leaf path: checksum} of a train state (plain arrays, as saved and restored)."""
  sums = jax.device_get(_checksums(state))
  return {jax.tree_util.keystr(path): int(np.asarray(v))
          for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, data=None) -> None:
  """The state, `meta` (JSON, with the state's checksums) and, when given, `data`: the training data's grain
  iterator, whose position is saved as its own item (one per process)."""
  items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, 'checksums': checksums(state)}))
  if data is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data)
  mngr.save(step, args=ocp.args.Composite(**items))


def damaged_leaves(state, saved: dict[str, int]) -> list[str]:
  """The leaves of a restored `state` whose checksum is not the one recorded when it was saved."""
  now = checksums(state)
  return sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))


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
  a finalised one that was damaged afterwards (truncated or deleted files, or flipped bits that still decode,
  caught by the recorded checksums) is skipped with a warning and the previous one is used.
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
    if 'checksums' in meta:  # checkpoints written before checksums were recorded are taken as they are
      bad = damaged_leaves(restored['state'], meta['checksums'])
      if bad:
        logging.warning('checkpoint at step %d in %s is damaged (checksum mismatch in %d leaves, e.g. %s); '
                        'trying the previous one', step, workdir, len(bad), bad[0])
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
