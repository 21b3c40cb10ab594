"""When and how the trainer calls jax.distributed.initialize (the arguments only: no processes started)."""

import ml_collections
import pytest

from posjax.errors import ConfigError
from posjax.training import distributed

CLUSTER_VARS = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_NTASKS',
                'SLURM_PROCID', 'OMPI_COMM_WORLD_SIZE')


def dist(**kw):
  d = dict(initialize='auto', coordinator_address='', num_processes=0, process_id=-1)
  d.update(kw)
  return ml_collections.ConfigDict(d)


@pytest.fixture
def env(monkeypatch):
  for k in CLUSTER_VARS:
    monkeypatch.delenv(k, raising=False)
  return monkeypatch


def test_single_process_by_default(env):
  assert distributed.initialize_args(dist()) is None
  env.setenv('SLURM_NTASKS', '1')  # an interactive one-task allocation is not a cluster run
  env.setenv('SLURM_PROCID', '0')
  assert distributed.initialize_args(dist()) is None
  assert distributed.initialize_args(dist(initialize='off', coordinator_address='h:1')) is None


def test_config_fields_win_over_the_environment(env):
  env.setenv('JAX_COORDINATOR_ADDRESS', 'envhost:1')
  env.setenv('JAX_NUM_PROCESSES', '4')
  env.setenv('JAX_PROCESS_ID', '3')
  assert distributed.initialize_args(dist()) == dict(coordinator_address='envhost:1', num_processes=4,
                                                     process_id=3)
  assert distributed.initialize_args(dist(coordinator_address='h:2', num_processes=2, process_id=1)) == dict(
      coordinator_address='h:2', num_processes=2, process_id=1)


def test_cluster_launchers_leave_the_rest_to_jax(env):
  env.setenv('SLURM_NTASKS', '8')
  env.setenv('SLURM_PROCID', '5')
  assert distributed.initialize_args(dist()) == {}  # jax reads SLURM's variables itself
  env.delenv('SLURM_NTASKS')
  assert distributed.initialize_args(dist(initialize='on')) == {}  # TPU pods: no arguments


@pytest.mark.parametrize('fields, message', [
    (dict(initialize='yes'), "distributed.initialize 'yes' is not one of auto, on, off"),
    (dict(coordinator_address='h:1', num_processes=2), r"give both num_processes and process_id .* \(got 2, None\)"),
    (dict(coordinator_address='h:1', num_processes=2, process_id=2),
     r'distributed.process_id \(2\) must be in \[0, num_processes=2\)'),
])
def test_bad_fields(env, fields, message):
  with pytest.raises(ConfigError, match=message):
    distributed.initialize_args(dist(**fields))
