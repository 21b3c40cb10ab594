"""Sharding mistakes stop before compilation with one error naming the numbers (checked on an abstract
mesh: no devices needed)."""

import pytest
from jax.sharding import AbstractMesh

from helpers import load_config_module, micro_config
from posjax.errors import ConfigError
from posjax.training import objectives, optimizer, pretraining, sharding, trainer


def setup(c, mesh_shape):
  mesh = AbstractMesh(mesh_shape, sharding.MESH_AXES)
  mcfg = pretraining.model_config(c, 100)
  objective = objectives.make(c, mcfg, c.data.seq_len, 5, forbidden_ids=(0, 2, 3))
  return trainer.sharded_steps(c, objective, optimizer.make(c), optimizer.schedule(c), mesh)


@pytest.mark.parametrize('mesh, devices, message', [
    ({'data': 2, 'fsdp': 2, 'tensor': 3}, 8, r"'data': 2, 'fsdp': 2, 'tensor': 3} needs 12 devices, but 8 are"),
    ({'data': -1, 'fsdp': 3, 'tensor': 1}, 8, r"8 devices cannot be split with fixed axes .*'fsdp': 3"),
])
def test_mesh_that_does_not_divide_the_devices(mesh, devices, message):
  with pytest.raises(ConfigError, match=message):
    sharding.mesh_shape(mesh, devices)


def test_rule_naming_an_unknown_mesh_axis():
  c = micro_config()
  c.logical_axis_rules = list(c.logical_axis_rules) + [('mlp', ('tensor', 'model'))]
  with pytest.raises(ConfigError, match=r"logical_axis_rules: 'mlp' -> 'model' names an unknown mesh axis; "
                                        'mesh axes: data, fsdp, tensor'):
    sharding.rules(c)


def test_batch_not_divisible_by_micro_batches_times_data_axes():
  c = micro_config(batch_size=12, grad_accum_steps=2)
  with pytest.raises(ConfigError, match=r'batch_size \(12\) must be divisible by grad_accum_steps \(2\) x the '
                                        r'mesh axes the batch is split over \(data=2 x fsdp=2: 4\) = 8'):
    setup(c, (2, 2, 2))
  setup(micro_config(batch_size=16, grad_accum_steps=2), (2, 2, 2))  # 16 = 2 x 4 x 2 rows: fine


def test_tensor_axis_not_dividing_the_heads():
  c = micro_config()  # 2 heads
  with pytest.raises(ConfigError, match=r"encoder/layer_0/attention/\w+/\w+: its 'heads' axis has 2 "
                                        r'\(model.num_heads\), which the mesh axes .* \(tensor=4: 4\) do not'):
    setup(c, (2, 1, 4))


def test_tensor_axis_not_dividing_the_electra_generator_heads():
  c = load_config_module('electra').get_config('tiny')
  c.model.update(hidden_size=64, num_heads=4, intermediate_size=128, num_layers=1, embedding_size=32)
  c.data.seq_len, c.batch_size = 16, 8
  c.electra.generator_fraction = 0.25  # 4 x 0.25 = 1 generator head; the discriminator's 4 would divide
  with pytest.raises(ConfigError, match=r"generator/encoder/layer_0/attention/\w+/\w+: its 'heads' axis "
                                        r'has 1 \(the ELECTRA generator has .*\(tensor=4: 4\)'):
    setup(c, (2, 1, 4))
