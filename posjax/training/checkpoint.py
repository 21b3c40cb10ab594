"""Orbax checkpoints of the train state plus a JSON record of the model config they belong to and of a checksum
of every leaf of the state, so a checkpoint damaged after it was written is never silently resumed from."""

from __future__ import annotations

import errno
import hashlib
import json
import logging as std_logging
import os
import re
import shutil
import sys

from absl import logging
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from posjax.errors import ConfigError, WriteError


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


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def data_digests(data) -> list[str]:
  """Per process, a digest of the data iterator's state: its saved position is checked on resume like the
  state's leaves (an edited `next_index` would otherwise shift the batches silently)."""
  mine = _digest(data.get_state())
  if jax.process_count() == 1:
    return [mine]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.frombuffer(bytes.fromhex(mine), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(raw)).reshape(jax.process_count(), -1)
  return [bytes(row).hex() for row in every.astype(np.uint8)]


def file_digest(path: str) -> str | None:
  """sha256 of a file (the run's tokenizer), None when it is absent."""
  if not os.path.exists(path):
    return None
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def _from_orbax(record) -> bool:
  """A log record of an exception raised inside orbax or tensorstore. A tensorstore future awaited as an
  asyncio task raises from C++: its traceback has asyncio's frames only, and its message the tensorstore
  spec."""
  if not record.exc_info:
    return False
  tb = record.exc_info[2]
  while tb is not None:
    if any(part in tb.tb_frame.f_code.co_filename for part in ('/orbax/', 'tensorstore')):
      return True
    tb = tb.tb_next
  return 'tensorstore_spec=' in str(record.exc_info[1])


# Orbax runs its reads and writes as asyncio tasks; when one fails (a full disk, a damaged file) the error
# reaches us through the call, and asyncio also logs every failed sibling task with its traceback. Those
# duplicates are dropped.
std_logging.getLogger('asyncio').addFilter(
    lambda r: not (str(r.msg).startswith('Task exception was never retrieved') and _from_orbax(r)))


def _drop_failed_read_aftermath(previous):
  """After a failed read orbax closes its event loop while tensorstore still completes the read's other
  futures: their callbacks raise 'Event loop is closed' where nothing can catch it, and the read's sibling
  coroutines, closed while they await, turn that GeneratorExit into an Exception of their own (orbax catches
  BaseException around each read). Python prints each as an unraisable traceback, when it collects them; the
  failure itself was already raised through the call."""
  def hook(unraisable):
    e, obj = unraisable.exc_value, unraisable.object
    closed_loop = isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'
    closed_read = (isinstance(e, Exception) and isinstance(e.__cause__, GeneratorExit)
                   and '/orbax/' in getattr(getattr(obj, 'cr_code', None), 'co_filename', ''))
    if not (closed_loop or closed_read):
      previous(unraisable)
  return hook


sys.unraisablehook = _drop_failed_read_aftermath(sys.unraisablehook)


def human_bytes(n: float) -> str:
  for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
    if n < 1024 or unit == 'TB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024


def check_space(directory: str, state) -> None:
  """A save that cannot fit is an error naming the path and the space, before orbax starts writing it."""
  need = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in getattr(x, 'addressable_shards', ())
             ) or sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
  need = int(need * 1.05) + (1 << 20)
  os.makedirs(directory, exist_ok=True)
  free = shutil.disk_usage(directory).free
  if free < need:
    raise WriteError(f'{directory}: no space for the next checkpoint: it needs about {human_bytes(need)} and the disk '
                     f'has {human_bytes(free)} free')


def is_disk_full(e: BaseException) -> bool:
  """Whether `e` (an OSError, or orbax's and tensorstore's wrapping of one) says a disk is full."""
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  return 'No space left on device' in str(e) or "os_error_code='28'" in str(e)


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, data=None) -> None:
  """The state, `meta` (JSON, with the state's checksums) and, when given, `data`: the training data's grain
  iterator, whose position is saved as its own item (one per process) and whose digest goes into `meta`.

  Orbax declines, returning False and logging nothing, to save a step that is not newer than the latest one
  on disk; `restore_latest` moves aside what would make it decline, and a refusal that still happens is an
  error here, never a save reported as done."""
  check_space(str(mngr.directory), state)
  meta = {**meta, 'checksums': checksums(state)}
  items = dict(state=ocp.args.StandardSave(state))
  if data is not None:
    meta['data_digests'] = data_digests(data)
    items['data'] = grain.checkpoint.CheckpointSave(data)
  items['meta'] = ocp.args.JsonSave(meta)
  if not mngr.save(step, args=ocp.args.Composite(**items)):
    raise WriteError(f'the checkpoint at step {step} was not written: {mngr.directory} already holds step '
                    f'{mngr.latest_step()}, and orbax only saves newer steps')


def _top_level_name(path: str) -> str:
  # A TrainState's field reads `.params[...]`; restored without a template, the same leaf reads `['params'][...]`.
  return re.sub(r"^(?:\.(\w+)|\['(\w+)'\])", lambda m: m.group(1) or m.group(2), path)


def damaged_leaves(state, saved: dict[str, int], only: str = '') -> list[str]:
  """The leaves of a restored `state` whose checksum is not the one recorded when it was saved; `only`: of
  the leaves under that top-level field (a reader restores the parameters alone, without the optimizer's
  types)."""
  now = {_top_level_name(k): v for k, v in checksums(state if not only else {only: state[only]}).items()}
  saved = {_top_level_name(k): v for k, v in saved.items()}
  if only:
    saved = {k: v for k, v in saved.items() if k.startswith(only + '[')}
  return sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))


def check_compatible(saved_model: dict, model: dict, workdir: str) -> None:
  """A workdir's checkpoint must be of the configured model: never silently re-initialise."""
  diff = {k: (saved_model.get(k), v) for k, v in model.items() if saved_model.get(k) != v}
  if diff:
    fields = ', '.join(f'model.{k}: checkpoint {a!r} vs config {b!r}' for k, (a, b) in sorted(diff.items()))
    raise ConfigError(f'workdir {workdir!r} holds a checkpoint of a different model ({fields}); use a new '
                      'workdir or the same config')


SET_ASIDE = 'checkpoints.set-aside'


def _agree(ok: bool) -> bool:
  """Whether `ok` holds on every process (all of them must skip the same checkpoints)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).all())


def set_aside(mngr: ocp.CheckpointManager, why: dict[int, str]) -> None:
  """Moves checkpoints/STEP of every step in `why` to checkpoints.set-aside/STEP (beside checkpoints/), naming
  each in the log: a damaged or stray step directory newer than the resumed one would otherwise make orbax
  decline every save up to its step. Nothing is deleted."""
  root = os.path.join(os.path.dirname(str(mngr.directory)), SET_ASIDE)
  if jax.process_index() == 0:
    for step, reason in sorted(why.items()):
      dest = os.path.join(root, str(step))
      n = 1
      while os.path.exists(dest):
        n += 1
        dest = os.path.join(root, f'{step}.{n}')
      os.makedirs(root, exist_ok=True)
      os.replace(os.path.join(str(mngr.directory), str(step)), dest)
      logging.warning('moved checkpoint %d aside to %s (%s)', step, dest, reason)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('posjax checkpoints set aside')
  mngr.reload()


def _first_line(e: Exception) -> str:
  return f'{type(e).__name__}: {str(e).splitlines()[0][:200]}' if str(e) else type(e).__name__


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, model: dict | None, workdir: str, data=None,
                   tokenizer_digest: str | None = None, read_only: bool = False, steps=None):
  """(state, meta) from the latest readable checkpoint, or (None, None) when there is none; `data`, a grain
  iterator, is set to the state saved with it. `model`: the model fields the checkpoint must have been
  written for (None: any). `tokenizer_digest`: the sha256 of the tokenizer the run uses, which must be the
  one the checkpoint was trained with. `abstract_state` None restores the arrays as they were saved.
  `read_only` (a reader of another run's workdir): nothing is moved. `steps`: the candidates (default: all).

  Orbax only finalises a checkpoint directory once it is complete, so a save cut off midway is never listed;
  a finalised one that was damaged afterwards (truncated or deleted files, or flipped bits that still decode,
  caught by the recorded checksums of the state and of the data iterator's position) is skipped with a
  warning and the previous one is used. Damaged and stray (not an orbax checkpoint) step directories newer
  than the one resumed from are moved aside (`set_aside`). When every checkpoint is damaged the run stops
  naming them: nothing is moved and nothing starts afresh over them.
  """
  steps = sorted(mngr.all_steps() if steps is None else steps, reverse=True)
  skipped, damaged = {}, []
  for step in steps:
    path = os.path.join(str(mngr.directory), str(step))
    if not os.path.exists(os.path.join(path, '_CHECKPOINT_METADATA')):
      skipped[step] = 'not an orbax checkpoint'
      continue
    meta, why = None, ''
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # pylint: disable=broad-except  (any unreadable file means: try the previous one)
      why = f'unreadable: {_first_line(e)}'
    if not _agree(meta is not None):
      why = why or 'unreadable on another process'
      logging.warning('checkpoint at step %d in %s is %s; trying the previous one', step, workdir, why)
      skipped[step], damaged = why, damaged + [step]
      continue
    if model is not None:
      check_compatible(meta['model'], model, workdir)
    restored = None
    try:
      items = dict(state=ocp.args.StandardRestore(abstract_state))
      # grain saves one state per process: a checkpoint of older code, or of another number of processes,
      # has none for this one.
      mine = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
      if data is not None and os.path.exists(os.path.join(path, 'data', mine)):
        items['data'] = grain.checkpoint.CheckpointRestore(data)
      elif data is not None:
        logging.warning('the checkpoint at step %d holds no data iterator state for %s; the data starts '
                        'afresh', step, mine)
      restored = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      why = f'unreadable: {_first_line(e)}'
    if restored is not None and 'checksums' in meta:  # older checkpoints have none: taken as they are
      bad = damaged_leaves(restored['state'], meta['checksums'], only='' if abstract_state is not None else 'params')
      if bad:
        why = f'damaged: checksum mismatch in {len(bad)} leaves, e.g. {bad[0]}'
      elif 'data' in restored and 'data_digests' in meta:
        digests = meta['data_digests']
        if len(digests) != jax.process_count() or digests[jax.process_index()] != _digest(data.get_state()):
          why = "damaged: the data iterator's saved position does not match its checksum"
    if not _agree(not why):
      why = why or 'damaged on another process'
      logging.warning('checkpoint at step %d in %s is %s; trying the previous one', step, workdir, why)
      skipped[step], damaged = why, damaged + [step]
      continue
    recorded = meta.get('tokenizer_sha256')
    if recorded and tokenizer_digest and recorded != tokenizer_digest:
      raise ConfigError(f'workdir {workdir!r}: its tokenizer is not the one the checkpoint at step {step} was '
                        'trained with (sha256 differs); put that tokenizer back or use a new workdir')
    if skipped and not read_only:
      set_aside(mngr, skipped)
    return restored['state'], meta
  if damaged:
    raise ConfigError(f'workdir {workdir!r}: none of its checkpoints ({", ".join(map(str, damaged))}) can be '
                      f'read; move them out of {mngr.directory} to start afresh')
  if skipped and not read_only:
    set_aside(mngr, skipped)
  return None, None


def read(workdir: str, step: int | None = None):
  """(step, meta, params as NumPy arrays) of a posjax workdir's latest readable checkpoint (or of `step`),
  verified against its checksums as a resume is: a damaged latest one is skipped with a warning naming it.
  Nothing in the workdir is changed."""
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not os.path.isdir(directory):
    raise ConfigError(f'{workdir!r} has no checkpoints/ directory (train first)')
  mngr = ocp.CheckpointManager(directory)  # no options: it neither creates nor deletes anything
  try:
    available = mngr.all_steps()
    if step is not None and step not in available:
      raise ConfigError(f'{workdir!r} has no checkpoint at step {step}; it has '
                        f'{", ".join(map(str, sorted(available))) or "none"}')
    state, meta = restore_latest(mngr, None, None, workdir, read_only=True,
                                 steps=None if step is None else [step])
  finally:
    mngr.close()
  if state is None:
    raise ConfigError(f'{workdir!r} has no readable checkpoint in {directory}')
  return int(np.asarray(state['step'])), meta, jax.tree.map(np.asarray, state['params'])


def abstract_with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs with their target shardings, logical-axis boxes removed (for StandardRestore)."""
  plain = jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
                                 abstract_state, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), plain, shardings)
