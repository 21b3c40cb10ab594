"""The README stays true to the code: its variant table and its two commands."""

import os

from helpers import ROOT
from posjax.attention import table


def readme():
  with open(os.path.join(ROOT, 'README.md')) as f:
    return f.read()


def test_variant_table_is_current():
  assert table.markdown() in readme(), 'run: python -m posjax.attention.table --update README.md'


def test_ci_runs_the_readme_test_command():
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci = f.read()
  command = ("python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && "
             'python -m pytest')
  assert command in readme()
  assert command in ci
  assert 'python train.py --config=configs/bert.py:tiny --workdir=' in readme()


CHECK_SLOPE = """
import jax, jax.numpy as jnp, numpy as np, posjax
from posjax import analysis
from posjax.errors import ConfigError
cfg = posjax.ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                         max_position_embeddings=16, attention='none+slope')
ids = jnp.ones((2, 8), jnp.int32)
params = posjax.Bert(cfg).init(jax.random.PRNGKey(0), ids)['params']
out = posjax.Bert(cfg).apply({'params': params}, ids, jnp.ones((2, 8), bool))
assert np.isfinite(np.asarray(out['hidden_BxLxD'])).all()
kernel = analysis.kernels(cfg, params, 8)[0]['slope']
w = np.abs(np.asarray(jax.tree_util.tree_leaves(params['encoder']['layer_0']['attention']['slope'])[0]))
np.testing.assert_allclose(kernel.values_HxR, -w[:, None] * np.abs(np.arange(-7, 8))[None], rtol=1e-6)
try:
  posjax.ModelConfig(attention='none+slope', attention_options=(('slope_scale', 0.0),))
except ConfigError as e:
  print(e)
"""


def test_the_score_term_example_registers_trains_and_checks_its_option():
  """The README's 'Adding a score term' block, run as written in a fresh process (the registry is global):
  the term is a component like the built-in ones (model, option check, analysis kernel)."""
  import re  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  block = re.search(r'learned linear distance penalty.*?```python\n(.*?)```', readme(), re.S).group(1)
  out = subprocess.run([sys.executable, '-c', block + CHECK_SLOPE], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == 'attention option slope_scale must be a number > 0; got 0.0'
