"""Data, FSDP, tensor and mixed 2x2x2 parallelism on 8 CPU devices give the single-device result, and XLA
partitions every tensor without replicating it whole."""

import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


# ~100 s each on 2 cores: BERT runs by default, ALBERT and ConvBERT with `-m slow`.
@pytest.mark.parametrize('name, variant', [
    ('bert', 'relative_key'),
    pytest.param('albert', 'relative_key_query', marks=pytest.mark.slow),
    pytest.param('convbert', 'absolute+convbert', marks=pytest.mark.slow),
    pytest.param('electra', 'absolute', marks=pytest.mark.slow)])
def test_sharded_steps_match_one_device(tmp_path, name, variant):
  out = tmp_path / 'result.npz'
  run = subprocess.run([sys.executable, os.path.join(HERE, 'sharding_worker.py'), name, variant, str(out)],
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-4000:]
  r = np.load(out)
  params = sorted(k.split('/', 1)[1] for k in r.files if k.startswith('single/') and k != 'single/loss')
  assert len(params) > 20
  for mesh in ('data', 'fsdp', 'tensor', 'mix'):
    np.testing.assert_allclose(r[f'{mesh}/loss'], r['single/loss'], rtol=1e-5, err_msg=mesh)
    for p in params:
      np.testing.assert_allclose(r[f'{mesh}/{p}'], r[f'single/{p}'], atol=2e-6, rtol=1e-5,
                                 err_msg=f'{mesh} {p}')
  # 8-way FSDP: each device holds about an eighth of the parameter and optimizer bytes, not a full copy.
  assert float(r['fsdp_bytes_fraction']) < 0.2, float(r['fsdp_bytes_fraction'])
  # No tensor's sharding forced XLA to replicate it whole (it warns "[SPMD] Involuntary full
  # rematerialization"): the embedding lookups did under FSDP with tensor parallelism (the mix mesh).
  assert int(r['involuntary_remat']) == 0, run.stderr[-4000:]
