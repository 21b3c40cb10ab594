"""No unsafe loading: nothing in posjax can unpickle, and loading a checkpoint never touches the network."""

import ast
import glob
import os
import socket

import pytest

from helpers import ROOT

UNPICKLERS = {'pickle', 'cPickle', 'dill', 'cloudpickle', 'joblib', 'shelve', 'marshal'}
NETWORK = {'urllib', 'requests', 'httpx', 'http', 'socket', 'huggingface_hub', 'aiohttp'}
SOURCES = sorted(glob.glob(os.path.join(ROOT, 'posjax', '**', '*.py'), recursive=True) +
                 glob.glob(os.path.join(ROOT, 'configs', '*.py')) + [os.path.join(ROOT, 'train.py')])


def keyword(call, name):
  for k in call.keywords:
    if k.arg == name:
      return k.value.value if isinstance(k.value, ast.Constant) else k.value
  return None


def dotted(node):
  if isinstance(node, ast.Attribute):
    inner = dotted(node.value)
    return f'{inner}.{node.attr}' if inner else None
  return node.id if isinstance(node, ast.Name) else None


PREPARERS = (os.path.join('posjax', 'data', 'prepare.py'), os.path.join('posjax', 'data', 'sources.py'))


def problems(source: str, where: str) -> list[str]:
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or '']
      for n in names:
        if n.split('.')[0] in UNPICKLERS:
          found.append(f'{where}:{node.lineno}: imports {n}')
        if n.split('.')[0] in NETWORK:
          found.append(f'{where}:{node.lineno}: imports {n} (network)')
    if isinstance(node, ast.Call):
      name = dotted(node.func) or ''
      if keyword(node, 'allow_pickle') not in (None, False):
        found.append(f'{where}:{node.lineno}: allow_pickle')
      if name.endswith('torch.load') and keyword(node, 'weights_only') is not True:
        found.append(f'{where}:{node.lineno}: torch.load without weights_only=True')
      if name.endswith('from_pretrained') and keyword(node, 'local_files_only') is not True:
        found.append(f'{where}:{node.lineno}: from_pretrained without local_files_only=True')
      # (tfds.builder only constructs: nothing is fetched before download_and_prepare, which posjax calls in
      # two places: prepare.py, the command a user runs to prepare a dataset, and sources.py, on its own
      # local-files builder, which reads nothing but those files.)
      if name.startswith('tfds.') and keyword(node, 'download') not in (False,) and name.split('.')[-1] in (
          'load', 'data_source'):
        found.append(f'{where}:{node.lineno}: {name} without download=False')
      if name.endswith('download_and_prepare') and where not in PREPARERS:
        found.append(f'{where}:{node.lineno}: download_and_prepare outside {", ".join(PREPARERS)}')
  return found


def test_the_scan_sees_what_it_forbids():
  bad = ('import pickle\nfrom dill import loads\nimport torch\ntorch.load(f)\ntorch.load(f, weights_only=False)\n'
         'np.load(f, allow_pickle=True)\nm.from_pretrained(d)\ntfds.data_source("imdb")\nimport urllib.request\n'
         'b.download_and_prepare()\n')
  assert len(problems(bad, 'x')) == 9
  good = 'torch.load(f, weights_only=True)\nnp.load(f)\ntfds.data_source("imdb", download=False)\n'
  assert problems(good, 'x') == []


def test_posjax_has_no_unpickling_and_no_network_code():
  assert len(SOURCES) > 30
  found = []
  for path in SOURCES:
    with open(path, encoding='utf-8') as f:
      found += problems(f.read(), os.path.relpath(path, ROOT))
  assert not found, '\n'.join(found)


@pytest.fixture
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args}')
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)
  monkeypatch.setattr(socket, 'getaddrinfo', refuse)


def test_hf_checkpoint_loads_from_its_directory_alone(tmp_path, no_network):
  """A tiny BERT exported to a directory comes back with sockets refused (safetensors, local files only)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from posjax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from posjax.convert import hf, hf_bert  # pylint: disable=g-import-not-at-top
  from posjax import pretrained  # pylint: disable=g-import-not-at-top
  from posjax.models import Bert  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(vocab_size=7, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                    max_position_embeddings=16, mlm_head=True, pooler=True)
  params = hf.init_params(Bert(cfg))
  hf_bert.export_bert(cfg, params, str(tmp_path))
  (tmp_path / 'vocab.txt').write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'b']))
  assert not glob.glob(str(tmp_path / '*.bin'))
  pre = pretrained.load(str(tmp_path))
  import jax  # pylint: disable=g-import-not-at-top
  flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}  # noqa
  got, want = flat(pre.params), flat(params)
  assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
