"""posjax.training.host_memory: a fresh CPU process keeps freed buffers (no page faults on reuse); the
environment's own malloc settings win, and nothing changes where an accelerator may run the steps."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc',
                                reason='glibc malloc only')

# Runs a jitted computation with 4 MB temporaries five times and prints the minor page faults of the last
# four runs (~93k with glibc's defaults on a 2-core CI-like machine: every run maps its buffers afresh).
CHILD = r'''
import resource, sys
from posjax.training import host_memory
print(host_memory.keep_freed_memory() if sys.argv[1] == 'keep' else 'default')
import jax, jax.numpy as jnp
@jax.jit
def f(x):
  for _ in range(4):
    x = jnp.tanh(x @ x) + x
  return x.sum()
x = jnp.ones((1024, 1024)) / 1024
f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
'''


def _run(mode, **env):
  full = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_') and k != 'GLIBC_TUNABLES'}
  out = subprocess.run([sys.executable, '-c', CHILD, mode], env={**full, **env}, capture_output=True,
                       text=True, check=True, timeout=120).stdout.split('\n')
  return out[0], int(out[1])


def test_freed_memory_is_reused_without_page_faults():
  line, faults = _run('keep')
  assert line.startswith('host malloc: one arena'), line
  assert faults < 500, faults
  line, faults = _run('default')
  assert faults > 10000, faults


def test_environment_settings_win():
  line, faults = _run('keep', MALLOC_ARENA_MAX='4')
  assert line == 'host malloc: left as the environment sets it'
  assert faults > 10000, faults


def test_left_alone_where_an_accelerator_may_run():
  # No computation follows, so JAX never tries to initialise the (absent) TPU backend.
  code = 'from posjax.training import host_memory; print(host_memory.keep_freed_memory())'
  env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
  for platforms in ('tpu', 'cuda,cpu'):
    out = subprocess.run([sys.executable, '-c', code], env={**env, 'JAX_PLATFORMS': platforms},
                         capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    assert out == 'host malloc: left as is (an accelerator may run the steps)', (platforms, out)
