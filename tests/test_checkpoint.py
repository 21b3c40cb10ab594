"""A damaged latest checkpoint (truncated, missing or bit-flipped files) is skipped for the previous one."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posjax.errors import ConfigError
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


@pytest.mark.parametrize('damage', [truncate, delete, flip_a_bit], ids=lambda f: f.__name__)
def test_damaged_latest_falls_back_to_the_previous_with_a_warning(tmp_path, caplog, damage):
  workdir = saved_workdir(tmp_path)
  damage(workdir)
  assert same(restore(workdir), state_at(1))
  assert 'checkpoint at step 2' in caplog.text and 'trying the previous one' in caplog.text


def test_a_flipped_bit_is_caught_by_the_checksum(tmp_path, caplog):
  workdir = saved_workdir(tmp_path)
  flip_a_bit(workdir)
  restore(workdir)
  assert "is damaged (checksum mismatch in 1 leaves, e.g. ['params']['w'])" in caplog.text


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
