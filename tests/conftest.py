import os

import pytest

# Tests run on the CPU with one device: compiling for 8 fake devices doubles compile time, so tests that need
# a multi-device mesh start their own process with XLA_FLAGS=--xla_force_host_platform_device_count=8.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# LLVM's optimisation of XLA:CPU code is most of the compile time of the suite's tiny programs (a 1-layer BERT
# train step: 7.3 s -> 2.7 s to compile, its init 5.4 s -> 2.3 s) and buys nothing at these sizes, where
# compiling is most of every test. Tests and the processes they start (they inherit the environment; see
# helpers.xla_flags) run such code; the product's defaults are untouched. A level given in XLA_FLAGS wins.
os.environ['XLA_FLAGS'] = ('--xla_backend_optimization_level=0 ' + os.environ.get('XLA_FLAGS', '')).strip()

SHARED_DATA = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data')


@pytest.fixture
def shared_data():
  path = os.path.abspath(SHARED_DATA)
  if not os.path.isdir(path):
    pytest.skip(f'real data folder {path} is absent (it sits beside the repository on the project machines)')
  return path


@pytest.fixture(autouse=True, scope='session')
def tfds_data_dir(tmp_path_factory):
  """Prepared datasets (the default corpus's among them) go to one temporary data dir per session, never
  to ~/tensorflow_datasets, and are reused by every test of the session."""
  path = str(tmp_path_factory.mktemp('tensorflow_datasets'))
  old = os.environ.get('TFDS_DATA_DIR')
  os.environ['TFDS_DATA_DIR'] = path
  yield path
  if old is None:
    del os.environ['TFDS_DATA_DIR']
  else:
    os.environ['TFDS_DATA_DIR'] = old
