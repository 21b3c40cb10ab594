"""posjax.training.host_memory: a fresh CPU process keeps freed buffers (no page faults on reuse); nothing
changes where the environment sets malloc itself, where an accelerator may run the steps, or once JAX's
backend has started."""

import os
import platform
import subprocess
import sys

import pytest

from posjax.training import host_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc',
                                reason='glibc malloc only')

# Runs a jitted computation with 2.25 MB temporaries five times and prints the minor page faults of the last
# four runs (~120k with glibc's defaults on a 2-core CI-like machine: every run maps its buffers afresh; with
# 1 MB ones glibc's sliding mmap threshold kept some, and the count varied from 4k to 22k with the load).
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
x = jnp.ones((768, 768)) / 768
f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
'''


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith('MALLOC_') and k not in ('GLIBC_TUNABLES', 'LD_PRELOAD')}
  return {**env, 'JAX_PLATFORMS': 'cpu', **extra}


def _line(env):
  """What keep_freed_memory() says in a fresh process with environment `env`."""
  code = 'from posjax.training import host_memory; print(host_memory.keep_freed_memory())'
  return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True,
                        timeout=120).stdout.strip()


def _run(mode, **extra):
  out = subprocess.run([sys.executable, '-c', CHILD, mode], env=_env(**extra), capture_output=True,
                       text=True, check=True, timeout=120).stdout.split('\n')
  return out[0], int(out[1])


def test_freed_memory_is_reused_without_page_faults():
  line, faults = _run('keep')
  assert line.startswith('host malloc: one arena'), line
  assert faults < 500, faults
  _, default_faults = _run('default')
  if default_faults < 10000:  # e.g. transparent huge pages set to `always`: little to compare against
    pytest.skip(f'glibc defaults took only {default_faults} page faults on this machine')


def test_environment_settings_win():
  assert _line(_env(MALLOC_ARENA_MAX='4')) == 'host malloc: left as the environment sets it'


@pytest.mark.parametrize('env', [{'JAX_PLATFORMS': 'tpu'}, {'JAX_PLATFORMS': 'cuda,cpu'},
                                 {'PJRT_NAMES_AND_LIBRARY_PATHS': 'x:/nonexistent/plugin.so'}])
def test_left_alone_where_an_accelerator_may_run(env):
  # No computation follows, so JAX never tries to initialise the (absent) accelerator backend.
  full = _env(**env)
  if 'JAX_PLATFORMS' not in env:
    del full['JAX_PLATFORMS']
  out = _line(full)
  assert out == 'host malloc: left as is (an accelerator may run the steps)', (env, out)


def test_nothing_changes_once_the_backend_has_started(monkeypatch):
  # The test process has computed already; mallopt must not be reached.
  import jax
  jax.devices()
  for v in ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_',
            'GLIBC_TUNABLES', 'LD_PRELOAD'):
    monkeypatch.delenv(v, raising=False)
  monkeypatch.setattr(host_memory, '_accelerator_possible', lambda: False)
  monkeypatch.setattr(host_memory.ctypes, 'CDLL', lambda *a: pytest.fail('mallopt called after start-up'))
  assert host_memory.keep_freed_memory() == 'host malloc: left as is (JAX had started its backend; call this first)'


def test_left_alone_where_a_pjrt_plugin_package_is_installed(tmp_path):
  # What jax[cuda12] and other PJRT plugins install: a module in the `jax_plugins` namespace package.
  (tmp_path / 'jax_plugins' / 'xla_fake').mkdir(parents=True)
  (tmp_path / 'jax_plugins' / 'xla_fake' / '__init__.py').write_text('')
  env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))
  del env['JAX_PLATFORMS']
  out = _line(env)
  assert out == 'host malloc: left as is (an accelerator may run the steps)', out


def test_cpu_runs_keep_the_settings_where_libtpu_is_installed():
  # libtpu lets a CPU machine compile for TPUs (posjax.aot) but runs nothing there: JAX runs on the CPU.
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('libtpu') is None:
    pytest.skip('libtpu is not installed')
  if host_memory._tpu_chips():  # pylint: disable=protected-access
    pytest.skip('this machine has TPU chips')
  env = _env()
  del env['JAX_PLATFORMS']
  out = _line(env)
  assert out.startswith('host malloc: one arena'), out


def test_tpu_chips_on_the_bus_leave_malloc_alone(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv('PJRT_NAMES_AND_LIBRARY_PATHS', raising=False)
  monkeypatch.setattr(host_memory.importlib.util, 'find_spec',
                      lambda name: object() if name == 'libtpu' else None)
  monkeypatch.setattr(host_memory.importlib.metadata, 'entry_points', lambda group: [])
  asked = jax.config.jax_platforms
  jax.config.update('jax_platforms', None)  # as without JAX_PLATFORMS
  try:
    monkeypatch.setattr(host_memory, '_tpu_chips', lambda: 4)
    assert host_memory._accelerator_possible()  # pylint: disable=protected-access
    monkeypatch.setattr(host_memory, '_tpu_chips', lambda: 0)
    assert not host_memory._accelerator_possible()  # pylint: disable=protected-access
  finally:
    jax.config.update('jax_platforms', asked)
