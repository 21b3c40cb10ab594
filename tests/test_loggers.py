"""Loggers a run writes to: metrics.jsonl and TensorBoard always, Weights & Biases when config.wandb.project is
set (a fake `wandb` module stands in: no network), with one error line before any work when the package is
missing; the extras that install tensorboard and wandb."""

import os
import sys
import types

import pytest

from helpers import ROOT, micro_config
from posjax.analysis import plot
from posjax.errors import ConfigError
from posjax.training import metrics, pretraining


class FakeWandb(types.ModuleType):
  """wandb's init / run.log / run.finish, recording the calls."""

  def __init__(self):
    super().__init__('wandb')
    self.inits, self.logged, self.finished = [], [], 0

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return self

  def log(self, data, step):
    self.logged.append((step, dict(data)))

  def finish(self):
    self.finished += 1


def test_missing_wandb_is_one_error_before_any_work(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # import wandb raises ImportError
  with pytest.raises(ConfigError, match=r"wandb.project is 'my-project' but the wandb package is not installed"):
    pretraining.train_and_evaluate(micro_config(**{'wandb.project': 'my-project'}), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_wandb_gets_what_metrics_jsonl_has(tmp_path, monkeypatch):
  fake = FakeWandb()
  monkeypatch.setitem(sys.modules, 'wandb', fake)
  work = tmp_path / 'tiny-run'
  pretraining.train_and_evaluate(micro_config(num_train_steps=6, log_every=2, eval_every=6, checkpoint_every=6,
                                              **{'wandb.project': 'p'}), str(work))
  init, = fake.inits
  run_id = (work / metrics.WANDB_ID).read_text().strip()
  assert init['project'] == 'p' and init['entity'] is None and init['name'] == 'tiny-run'
  assert init['id'] == run_id and init['resume'] == 'allow' and init['dir'] == str(work)
  assert init['config']['wandb']['project'] == 'p' and init['config']['num_train_steps'] == 6
  rows = metrics.read(str(work))
  assert [s for s, _ in fake.logged] == [r['step'] for r in rows] == [2, 4, 6, 6]
  for (_, logged), row in zip(fake.logged, rows):
    assert logged == pytest.approx({k: v for k, v in row.items() if k not in ('step', 'time')})
  assert fake.finished == 1
  # A resumed run logs to the same W&B run.
  metrics.Writer(str(work), 6, micro_config(**{'wandb.project': 'p'})).close()
  assert fake.inits[-1]['id'] == run_id
  # The same rows make the run's figure.
  assert plot.main([str(work)]) == 0 and (work / plot.FILE).stat().st_size > 5000


def test_extras_install_tensorboard_and_wandb():
  tomllib = pytest.importorskip('tomllib')  # Python 3.11+
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    extras = tomllib.load(f)['project']['optional-dependencies']
  assert extras['tensorboard'][0].startswith('tensorboard>=') and extras['wandb'][0].startswith('wandb>=')
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  assert "pip install 'posjax[tensorboard]'" in readme and 'tensorboard --logdir' in readme
  assert "pip install 'posjax[wandb]'" in readme and '--config.wandb.project=' in readme
