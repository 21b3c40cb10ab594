"""Keep freed host memory in the process, so that a CPU train step does not page-fault its buffers in anew.

XLA:CPU allocates each step's buffers with malloc and frees them at the end of the step. glibc maps large
allocations with mmap and unmaps them on free (always so for those above 64 MB made by any thread but the
main one, whatever mallopt says, unless there is a single arena), so every step touches fresh pages:
BERT-base, L=128, batch 8 took ~310k minor page faults and 0.5-1.3 s of system time per ~2 s step on two
cores. With one arena, no mmap and no trimming the same step takes no page faults and ran 1.69-1.83 s
instead of 1.92-2.52 s; ConvBERT, whose extra buffers churned more, went from 1.22x BERT's step to
0.97-0.99x, and the README's tiny pretraining from 8.1 to 11.3 steps/s.

The costs: the process keeps its peak host memory until it exits, which a trainer or a benchmark does
anyway, and compiling is slower (BERT-base: 6.2-8.3 s against 5.3-6.6 s, presumably one arena's lock shared
by XLA's compiler threads), repaid within the first ten steps. So it is applied only where the computation
runs on the CPU (an accelerator's buffers live on the device: decided by the platforms JAX is asked for, else
by the accelerators present, not by the libraries installed), and by programs (train.py, bench/run.py,
`python -m posjax.compare`, `python -m posjax.analysis.extrapolation`, the quickstart notebook), not on
import. It must run before JAX initialises its backend: threads that have already allocated keep their
arenas (called after `jax.devices()`, it left the page faults as they were). Called later, it does
nothing and says so. Left alone too: MALLOC_ARENA_MAX, MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_,
MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES' glibc.malloc settings in the environment, and an allocator
preloaded in place of glibc's (LD_PRELOAD of jemalloc, tcmalloc, ...).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys

import jax

# mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_ENV = ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_')


def _plugin_has_hardware(name: str) -> bool:
  """Whether the accelerator an installed PJRT plugin (jax_plugins module or entry point `name`) drives is
  present. Unknown plugins are assumed present."""
  if 'cuda' in name:
    return any(os.path.exists(d) for d in ('/dev/nvidia0', '/dev/nvidiactl', '/dev/dxg'))
  if 'rocm' in name:
    return os.path.exists('/dev/kfd')
  return True


def _tpu_chips() -> int:
  """TPU chips on this machine's PCI bus, as JAX counts them before loading libtpu (libtpu installed on a
  machine without TPUs runs nothing: it only lets the machine compile for TPU topologies)."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0]
  except Exception:  # pylint: disable=broad-except  (a JAX without it: assume a TPU)
    return 1


def _accelerator_possible() -> bool:
  """Whether JAX's backend may be a GPU or TPU, judged without starting it (mallopt must come first): the
  platforms asked for (JAX_PLATFORMS; `cpu` alone makes it certain), else what JAX would find: a PJRT plugin
  named in the environment, TPU chips (with libtpu or TPU_LIBRARY_PATH), or the GPU of an installed PJRT
  plugin package (CUDA, ROCm; others are assumed to find theirs)."""
  asked = jax.config.jax_platforms
  if asked:
    return any(p.strip() not in ('', 'cpu') for p in asked.split(','))
  if os.environ.get('PJRT_NAMES_AND_LIBRARY_PATHS'):
    return True
  try:
    if (importlib.util.find_spec('libtpu') is not None or os.environ.get('TPU_LIBRARY_PATH')) and _tpu_chips():
      return True
    plugins = importlib.util.find_spec('jax_plugins')  # the namespace package PJRT plugins install into
    names = [m.name for m in pkgutil.iter_modules(plugins.submodule_search_locations or [])] if plugins else []
    names += [e.name for e in importlib.metadata.entry_points(group='jax_plugins')]
    return any(_plugin_has_hardware(n) for n in names)
  except Exception:  # pylint: disable=broad-except  (an odd installation: assume an accelerator)
    return True


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # pylint: disable=broad-except  (a JAX without it: assume started, change nothing)
    return True


def keep_freed_memory() -> str:
  """On a CPU-only JAX with glibc's malloc, before JAX's backend starts, sets malloc to reuse freed memory
  rather than return it to the kernel; returns what it did, as a line for the log."""
  if not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
    return 'host malloc: left as is (not glibc)'
  if 'malloc' in os.environ.get('LD_PRELOAD', ''):
    return 'host malloc: left as is (another allocator is preloaded)'
  if any(v in os.environ for v in _ENV) or 'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', ''):
    return 'host malloc: left as the environment sets it'
  if _accelerator_possible():
    return 'host malloc: left as is (an accelerator may run the steps)'
  if _backend_started():
    return 'host malloc: left as is (JAX had started its backend; call this first)'
  libc = ctypes.CDLL(None)
  # A trim threshold of -1 turns trimming off (mallopt(3)).
  done = [libc.mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))]
  if not all(done):
    return "host malloc: mallopt refused a setting (glibc's defaults may remain)"
  return 'host malloc: one arena, no mmap, no trimming (freed memory is reused, not returned)'
