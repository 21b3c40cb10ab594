"""The notebooks run top to bottom (small settings) in a kernel of this interpreter, importing this checkout's
posjax; the quickstart's comparison writes its table and plot."""

import json
import os
import sys

import pytest

from helpers import ROOT

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')


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
    assert (kernel_env / v / 'metrics.jsonl').exists()
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
  assert 'hf:bert absolute 2 layers 2 heads' in text
  assert 'Toeplitz matrix      1.0' in text
  figures = kernel_env / 'figures'
  for name in ('positional_attention.png', 'kernels.png', 'embedding_gram.png', 'attention_maps.png'):
    assert (figures / name).stat().st_size > 5000
  summary = json.loads((figures / 'summary.json').read_text())
  assert len(summary['positional_attention']) == 2
