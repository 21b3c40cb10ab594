"""posjax.aot for GPUs: one host's H100s/H200s named like TPU slices, compiled by XLA's GPU compiler on this
CPU host when JAX's CUDA plugin is installed (it is not in the test extra: ~5 GB of CUDA wheels)."""

import importlib.util

import pytest

from helpers import load_config_module
from posjax.aot import topology
from posjax.errors import ConfigError

HAS_PLUGIN = importlib.util.find_spec('jax_plugins') is not None and importlib.util.find_spec(
    'jax_plugins.xla_cuda12') is not None


@pytest.mark.parametrize('spec, chips', [('h100-8', 8), ('h200-1', 1), ('h100-2', 2)])
def test_gpu_hosts_are_named_by_their_count(spec, chips):
  topo = topology.parse(spec)
  assert topo.chips == chips and topo.name == spec and topo.chip.platform == 'gpu'
  assert 'core_count: 132' in topo.chip.gpu_target and topo.chip.device_kind in topo.chip.gpu_target


@pytest.mark.parametrize('spec, num_slices, message', [
    ('h100-16', 1, 'h100-N counts the GPUs of one host, N in 1, 2, 4, 8'),
    ('h200:8', 1, 'GPUs are named by their count, e.g. h200-8'),
    ('h100-8', 2, 'several GPU hosts are not modelled')])
def test_bad_gpu_topologies_are_one_line(spec, num_slices, message):
  with pytest.raises(ConfigError, match=message):
    topology.parse(spec, num_slices)


@pytest.mark.skipif(HAS_PLUGIN, reason="JAX's CUDA plugin is installed: the compile test below runs instead")
def test_without_the_cuda_plugin_the_error_says_what_to_install():
  with pytest.raises(ConfigError, match=r"h100-1: JAX cannot describe this GPU here .*pip install 'jax\[cuda12\]=="):
    topology.devices(topology.parse('h100-1'))


@pytest.mark.skipif(not HAS_PLUGIN, reason="needs JAX's CUDA plugin (pip install 'jax[cuda12]'), not in the "
                    'test extra')
def test_train_step_with_the_triton_kernel_compiles_for_an_h100():
  """Tiny BERT with TISA through the fused kernel on two H100s (FSDP): Triton compiles the kernel for sm_90
  (forward, dq, dk/dv), the report takes its costs from the HLO text and has a roofline."""
  from posjax.aot import compile as compile_lib  # pylint: disable=g-import-not-at-top
  c = load_config_module('bert').get_config('tiny,tisa')
  c.model.update(num_heads=2, hidden_size=128, dtype='bfloat16', attention_dropout=0.0, attention_impl='pallas')
  c.data.seq_len, c.batch_size = 128, 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 1
  topo = topology.parse('h100-2')
  compiled = compile_lib.compile_train_step(c, topology.devices(topo))
  text = compiled.compiled.as_text()
  assert all(k in text for k in ('_forward_kernel', '_dq_kernel', '_dkv_kernel')), 'no Triton kernel compiled'
  r = compile_lib.report(compiled, topo.chip, topo.name)
  assert r['costs_from'] == 'hlo text' and r['hlo_flops_per_chip'] > 0 and r['roofline']['mfu'] > 0
  assert r['collectives']['all-gather']['count'] > 0 and not r['warnings']
