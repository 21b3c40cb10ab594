"""The notebooks run top to bottom (small settings) in a kernel of this interpreter, importing this checkout's
posjax; the quickstart's comparison writes its table and plot. Their Colab badges and install cells follow
pyproject.toml's repository URL, and the install cell keeps the runtime's JAX."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import types

import pytest

from helpers import ROOT

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')
NOTEBOOKS = ('quickstart.ipynb', 'analysis.ipynb')


def pyproject():
  tomllib = pytest.importorskip('tomllib')  # Python 3.11+
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)['project']


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_colab_badge_and_install_cell_follow_pyproject(name):
  project = pyproject()
  repo = project['urls']['Repository']
  org_repo = re.fullmatch(r'https://github\.com/([\w.-]+/[\w.-]+)', repo).group(1)
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', name), as_version=4)
  # Colab's served form: /github/ORG/REPO/blob/BRANCH/PATH.
  badge = f'https://colab.research.google.com/github/{org_repo}/blob/main/notebooks/{name}'
  assert f'(https://colab.research.google.com/assets/colab-badge.svg)]({badge})' in nb.cells[0].source
  cell = nb.cells[1].source
  assert f"REPO = '{repo}'" in cell
  jax_min = next(re.fullmatch(r'jax>=(\d+)\.(\d+)', d) for d in project['dependencies'] if d.startswith('jax'))
  assert f'JAX_MIN = ({jax_min.group(1)}, {jax_min.group(2)})' in cell


def run_install_cell(monkeypatch, source, jax_version=None):
  """The install cell as Colab runs it (a google.colab module present); returns the pip command it ran and
  the constraints it wrote."""
  calls = []
  monkeypatch.setitem(sys.modules, 'google.colab', types.ModuleType('google.colab'))
  monkeypatch.setattr(subprocess, 'run', lambda cmd, check: calls.append(
      (cmd, open(cmd[cmd.index('-c') + 1]).read().split())))
  if jax_version:
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, 'version', lambda n: jax_version if n == 'jax' else real(n))
  exec(compile(source, 'install cell', 'exec'), {})  # pylint: disable=exec-used
  return calls


def test_install_cell_keeps_the_runtimes_jax(monkeypatch, capsys):
  cell = nbformat.read(os.path.join(ROOT, 'notebooks', NOTEBOOKS[0]), as_version=4).cells[1].source
  (cmd, pins), = run_install_cell(monkeypatch, cell)
  repo = pyproject()['urls']['Repository']
  assert cmd[:4] == [sys.executable, '-m', 'pip', 'install'] and cmd[-1] == f'posjax @ git+{repo}'
  for package in ('jax', 'jaxlib'):
    assert f'{package}=={importlib.metadata.version(package)}' in pins
  assert all(re.fullmatch(r'(jax|jaxlib|jax[-_](cuda|rocm)\d*[-_](plugin|pjrt)|libtpu(-nightly)?)==[\w.]+', p)
             for p in pins), pins
  assert 'kept jax==' in capsys.readouterr().out
  monkeypatch.undo()
  # pip, given those pins and posjax's requirements, changes none of them (here every requirement is installed
  # already, so it resolves offline), while a JAX older than posjax's minimum cannot be kept.
  with tempfile.NamedTemporaryFile('w', suffix='.txt') as f:
    f.write('\n'.join(pins) + '\n')
    f.flush()
    dry = subprocess.run([sys.executable, '-m', 'pip', 'install', '--dry-run', '--no-index', '-c', f.name,
                          *pyproject()['dependencies']], capture_output=True, text=True)
  assert dry.returncode == 0, dry.stderr[-2000:]
  assert 'Would install' not in dry.stdout, dry.stdout[-2000:]


def test_install_cell_refuses_an_old_jax(monkeypatch):
  cell = nbformat.read(os.path.join(ROOT, 'notebooks', NOTEBOOKS[0]), as_version=4).cells[1].source
  with pytest.raises(RuntimeError, match=r"this runtime's JAX 0.4.33 is older than posjax needs \(jax>=0.7\)"):
    run_install_cell(monkeypatch, cell, jax_version='0.4.33')


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """A kernelspec for sys.executable (not whatever `python3` a Jupyter install points at) and the
  environment the notebooks read: small settings, outputs under tmp_path, this checkout first on the path."""
  spec = tmp_path / 'jupyter' / 'kernels' / 'posjax-test'
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'posjax test', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('PYTHONPATH', ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  monkeypatch.setenv('POSJAX_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('POSJAX_NOTEBOOK_OUT', str(tmp_path / 'out'))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  return tmp_path / 'out'


def execute(name):
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', name), as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name='posjax-test', timeout=300,
                                   resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}})
  client.execute()
  return nb


def outputs_text(nb):
  return '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []))


def test_quickstart(kernel_env):
  nb = execute('quickstart.ipynb')
  assert 'google.colab' in nb.cells[1].source and 'pip' in nb.cells[1].source
  assert 'colab.research.google.com' in nb.cells[0].source
  for v in ('absolute', 'tisa', 'convfixed'):
    assert (kernel_env / v / 'seed0' / 'metrics.jsonl').exists()
  table = (kernel_env / 'results.md').read_text()
  assert all(f'| {v} |' in table for v in ('absolute', 'tisa', 'convfixed'))
  assert (kernel_env / 'loss_curves.png').stat().st_size > 5000
  assert (kernel_env / 'results.csv').read_text().count('\n') == 4
  text = outputs_text(nb)
  assert 'tisa       tau of the positional attention per layer and head: [[1.0' in text
  assert 'loss after 20 steps' in text


def test_analysis(kernel_env):
  nb = execute('analysis.ipynb')
  text = outputs_text(nb)
  assert 'Hugging Face bert checkpoint' in text and 'absolute 2 layers 2 heads' in text  # ck.source, ...
  assert 'Toeplitz matrix      1.0' in text
  figures = kernel_env / 'figures'
  for name in ('positional_attention.png', 'kernels.png', 'embedding_gram.png', 'attention_maps.png'):
    assert (figures / name).stat().st_size > 5000
  summary = json.loads((figures / 'summary.json').read_text())
  assert len(summary['positional_attention']) == 2
