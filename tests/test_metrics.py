"""GLUE metrics against scikit-learn and scipy on random inputs, and the GLUE score convention."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from posjax.finetune import metrics


@pytest.mark.parametrize('seed', range(5))
def test_classification_metrics_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, 400))
  label = rng.integers(0, 2, n)
  # Correlated predictions, so the metrics are away from zero.
  pred = np.where(rng.random(n) < 0.7, label, rng.integers(0, 2, n))
  assert metrics.accuracy(pred, label) == pytest.approx(skm.accuracy_score(label, pred), abs=1e-12)
  assert metrics.f1(pred, label) == pytest.approx(skm.f1_score(label, pred, zero_division=0), abs=1e-12)
  assert metrics.matthews(pred, label) == pytest.approx(skm.matthews_corrcoef(label, pred), abs=1e-12)


def test_degenerate_inputs_match_sklearn():
  label = np.array([0, 1, 0, 1, 1])
  for pred in (np.zeros(5, int), np.ones(5, int)):  # constant predictions: an empty confusion row
    assert metrics.matthews(pred, label) == pytest.approx(skm.matthews_corrcoef(label, pred))
    assert metrics.f1(pred, label) == pytest.approx(skm.f1_score(label, pred, zero_division=0))


@pytest.mark.parametrize('seed', range(5))
def test_correlations_match_scipy(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, 300))
  y = rng.uniform(0, 5, n)
  if seed % 2:  # STS-B's gold scores have many ties
    y = np.round(y * 5) / 5
  x = y + rng.normal(0, 1.5, n)
  if seed == 3:
    x = np.round(x)  # ties in the predictions too
  assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-10)
  assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10)


def test_task_and_glue_scores():
  mrpc = metrics.task_metrics('mrpc', [1, 1, 0, 1], [1, 0, 0, 1])
  assert mrpc == pytest.approx({'f1': 80.0, 'accuracy': 75.0})
  assert metrics.task_score('mrpc', {'dev': mrpc}) == pytest.approx(77.5)
  mnli = {'matched': {'accuracy': 80.0}, 'mismatched': {'accuracy': 82.0}}
  assert metrics.task_score('mnli', mnli) == pytest.approx(81.0)
  g = metrics.glue_score({'mrpc': 77.5, 'mnli': 81.0, 'wnli': 56.3})
  assert g['glue'] == pytest.approx((77.5 + 81.0) / 2)
  assert g['glue_with_wnli'] == pytest.approx((77.5 + 81.0 + 56.3) / 3)
