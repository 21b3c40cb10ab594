"""A damaged latest checkpoint (truncated, missing or bit-flipped files, an edited data position) is skipped
for the previous one and moved aside, so that it never blocks a save; a save that did not happen is an error;
readers (fine-tuning, analysis, extrapolation) verify what they read as a resume does."""

import gc
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posjax.errors import ConfigError, WriteError
from posjax.training import checkpoint

MODEL = {'hidden_size': 8}


def state_at(step):
  rng = np.random.default_rng(step)
  return {'params': {'w': jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
                     'b': jnp.asarray(rng.standard_normal(32), jnp.bfloat16)},
          'step': jnp.int32(step), 'rng': jnp.asarray(rng.integers(0, 2**32, 2, dtype=np.uint32))}


def saved_workdir(tmp_path, steps=(1, 2)):
  mngr = checkpoint.manager(str(tmp_path), 5)
  for s in steps:
    checkpoint.save(mngr, s, state_at(s), {'model': MODEL})
  mngr.wait_until_finished()
  mngr.close()
  return tmp_path


def restore(workdir):
  mngr = checkpoint.manager(str(workdir), 5)
  state, _ = checkpoint.restore_latest(mngr, jax.eval_shape(lambda: state_at(0)), MODEL, str(workdir))
  return state


def data_files(workdir, step):
  return sorted(glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'state', '**', 'd', '*'),
                          recursive=True), key=os.path.getsize)


def truncate(workdir):
  for path in data_files(workdir, 2):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 3)


def delete(workdir):
  os.remove(data_files(workdir, 2)[-1])


def flip_a_bit(workdir):
  """One bit in the middle of the largest data file: it still decompresses, to different numbers."""
  path = data_files(workdir, 2)[-1]
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 0x10
  with open(path, 'wb') as f:
    f.write(data)


def same(a, b):
  return all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_intact_latest_is_restored(tmp_path):
  assert same(restore(saved_workdir(tmp_path)), state_at(2))


# The failed read's aftermath (orbax's closed loop and closed sibling reads) would reach stderr as tracebacks
# when Python collects it: posjax's unraisable hook drops it, and pytest's sits behind that hook.
@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', [truncate, delete, flip_a_bit], ids=lambda f: f.__name__)
def test_damaged_latest_falls_back_to_the_previous_with_a_warning(tmp_path, caplog, damage):
  workdir = saved_workdir(tmp_path)
  damage(workdir)
  assert same(restore(workdir), state_at(1))
  gc.collect()
  assert 'checkpoint at step 2' in caplog.text and 'trying the previous one' in caplog.text


def test_a_flipped_bit_is_caught_by_the_checksum(tmp_path, caplog):
  workdir = saved_workdir(tmp_path)
  flip_a_bit(workdir)
  restore(workdir)
  assert "is damaged: checksum mismatch in 1 leaves, e.g. params['w']" in caplog.text


def test_every_checkpoint_damaged_is_a_one_line_error(tmp_path):
  workdir = saved_workdir(tmp_path, steps=(2,))
  truncate(workdir)
  with pytest.raises(ConfigError, match=r'none of its checkpoints \(2\) can be read'):
    restore(workdir)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_])
def test_checksum_changes_with_any_single_bit_and_with_a_swap(dtype):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 7)) * 50
  x = np.asarray(jnp.asarray(x > 0 if dtype == jnp.bool_ else x, dtype))
  base = checkpoint.checksums({'x': x})
  raw = x.view(np.uint8) if x.dtype != np.bool_ else None
  nbits = 1 if raw is None else 8 * x.dtype.itemsize
  for pos in rng.choice(x.size, 6, replace=False):
    for bit in rng.choice(nbits, min(nbits, 4), replace=False):
      y = x.copy()
      if raw is None:
        y.reshape(-1)[pos] = ~y.reshape(-1)[pos]
      else:
        y.view(np.uint8).reshape(x.size, -1)[pos, bit // 8] ^= np.uint8(1 << (bit % 8))
      assert checkpoint.checksums({'x': y}) != base, (pos, bit)
  y = x.copy().reshape(-1)
  i, j = np.flatnonzero(y != y[0])[0], 0
  y[[i, j]] = y[[j, i]]
  assert checkpoint.checksums({'x': y.reshape(x.shape)}) != base


def save_more(workdir, steps):
  mngr = checkpoint.manager(str(workdir), 5)
  for s in steps:
    checkpoint.save(mngr, s, state_at(s), {'model': MODEL})
  mngr.wait_until_finished()
  mngr.close()


@pytest.mark.parametrize('damage', [truncate, flip_a_bit, 'junk'], ids=lambda f: getattr(f, '__name__', f))
def test_what_was_skipped_is_moved_aside_and_later_steps_are_saved(tmp_path, caplog, damage):
  """A damaged (or stray, not-a-checkpoint) step newer than the one resumed from made orbax decline every
  later save without a word; now it is moved aside, named in the log, and the rerun's saves happen."""
  workdir = saved_workdir(tmp_path)
  if damage == 'junk':
    os.makedirs(os.path.join(workdir, 'checkpoints', '999'))
  else:
    damage(workdir)
  assert same(restore(workdir), state_at(2 if damage == 'junk' else 1))
  moved = '999' if damage == 'junk' else '2'
  assert f'moved checkpoint {moved} aside to' in caplog.text
  assert os.path.isdir(os.path.join(workdir, checkpoint.SET_ASIDE, moved))
  save_more(workdir, [3])
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())[-1] == 3
  assert same(restore(workdir), state_at(3))


def test_a_save_orbax_declines_is_an_error_not_a_success(tmp_path):
  workdir = saved_workdir(tmp_path, steps=(5,))
  mngr = checkpoint.manager(str(workdir), 5)
  with pytest.raises(WriteError, match=r'checkpoint at step 3 was not written: .* already holds step 5'):
    checkpoint.save(mngr, 3, state_at(3), {'model': MODEL})
  mngr.close()


def test_an_edited_data_position_is_caught_and_the_tokenizer_is_tied_to_the_checkpoint(tmp_path, caplog):
  import grain  # pylint: disable=g-import-not-at-top
  data = grain.MapDataset.range(1000).to_iter_dataset()
  mngr = checkpoint.manager(str(tmp_path), 5)
  it = iter(data)
  for step in (1, 2):
    next(it)
    checkpoint.save(mngr, step, state_at(step), {'model': MODEL, 'tokenizer_sha256': 'abc'}, data=it)
  mngr.wait_until_finished()
  mngr.close()
  path = glob.glob(os.path.join(tmp_path, 'checkpoints', '2', 'data', '*.json'))[0]
  saved = json.load(open(path))
  assert saved['next_index'] == 2
  with open(path, 'w') as f:
    json.dump({**saved, 'next_index': 7}, f)
  mngr = checkpoint.manager(str(tmp_path), 5)
  it = iter(data)
  state, _ = checkpoint.restore_latest(mngr, jax.eval_shape(lambda: state_at(0)), MODEL, str(tmp_path), data=it,
                                       tokenizer_digest='abc')
  assert same(state, state_at(1)) and next(it) == 1
  assert "data iterator's saved position does not match its checksum" in caplog.text
  with pytest.raises(ConfigError, match='its tokenizer is not the one the checkpoint at step 1 was trained with'):
    checkpoint.restore_latest(mngr, jax.eval_shape(lambda: state_at(0)), MODEL, str(tmp_path), data=iter(data),
                              tokenizer_digest='abd')
  mngr.close()


def test_readers_verify_like_a_resume_and_change_nothing(tmp_path, caplog):
  workdir = saved_workdir(tmp_path)
  step, meta, params = checkpoint.read(str(workdir))
  assert step == 2 and meta['model'] == MODEL and same(params, state_at(2)['params'])
  flip_a_bit(workdir)
  step, _, params = checkpoint.read(str(workdir))
  assert step == 1 and same(params, state_at(1)['params'])
  assert "checkpoint at step 2 in" in caplog.text and 'is damaged' in caplog.text
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '2'))  # a reader moves nothing
  with pytest.raises(ConfigError, match=r'none of its checkpoints \(2\) can be read'):
    checkpoint.read(str(workdir), step=2)
  with pytest.raises(ConfigError, match=r'has no checkpoint at step 7; it has 1, 2'):
    checkpoint.read(str(workdir), step=7)


def test_asyncio_duplicates_of_tensorstore_failures_are_dropped():
  """A failed read's sibling tensorstore futures, awaited as asyncio tasks, fail from C++: asyncio's 'Task
  exception was never retrieved' record then has no orbax or tensorstore frame, only the spec in its message.
  It is dropped like the others; another task's failure is not."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  import sys as std_sys  # pylint: disable=g-import-not-at-top
  from posjax.training import checkpoint as checkpoint_lib  # noqa: F401  (installs the filter)

  def record(message):
    try:
      raise ValueError(message)
    except ValueError:
      info = std_sys.exc_info()
    return std_logging.LogRecord('asyncio', std_logging.ERROR, __file__, 1,
                                 'Task exception was never retrieved\nfuture: <Task finished>', (), info)
  logger = std_logging.getLogger('asyncio')
  assert not logger.filter(record("OUT_OF_RANGE: Error reading [tensorstore_spec='{\"driver\":\"zarr\"}']"))
  assert logger.filter(record('a failure of our own'))
