"""bench/run.py: the report's arithmetic on a constructed report, and one real (tiny) measurement."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
import run as bench  # noqa: E402


def row(name, step, base_step, peak=None, flops=None, size='mini', seq_len=128):
  return {'name': name, 'size': size, 'seq_len': seq_len, 'batch': 8, 'step_s': step, 'base_step_s': base_step,
          'compile_s': 1.0, 'flops': flops, 'peak_bytes': peak, 'error': None, 'tokens_per_s': 1024 / step if step else None}


def test_ratios_use_the_interleaved_baseline_and_memory_of_the_same_shape():
  report = {'rows': [row('posjax bert absolute', 0.5, 0.5, peak=100.0),
                     row('posjax bert tisa', 0.6, 0.4, peak=130.0),  # baseline timed alongside: 0.4
                     row('posjax bert absolute', 2.0, 2.0, peak=400.0, seq_len=512),
                     row('posjax bert tisa', 3.0, 2.0, peak=440.0, seq_len=512),
                     row('torch BertForMaskedLM eager', 2.0, 0.5)]}
  got = {(r['name'], r['seq_len']): r for r in bench.ratios(report)}
  assert got[('posjax bert tisa', 128)]['ratio'] == pytest.approx(1.5)
  assert got[('posjax bert tisa', 128)]['memory_ratio'] == pytest.approx(1.3)
  assert got[('posjax bert tisa', 512)]['ratio'] == pytest.approx(1.5)
  assert got[('posjax bert tisa', 512)]['memory_ratio'] == pytest.approx(1.1)
  assert got[('torch BertForMaskedLM eager', 128)]['ratio'] == pytest.approx(4.0)
  assert ('posjax bert absolute', 128) not in got


def test_markdown_reports_mfu_failures_and_peer_speedups():
  report = {'machine': 'test', 'dtype': 'float32', 'batch': 8, 'steps': 3, 'matmul_peak_flops': 1e10,
            'date': 'now',
            'rows': [row('posjax bert absolute', 0.5, 0.5, peak=2.0**20, flops=2e9),
                     row('hf-flax FlaxBertForMaskedLM', 1.0, 0.5),
                     {**row('posjax bert t5', None, None), 'error': 'ValueError: boom'}]}
  md = bench.markdown(report)
  assert '| posjax bert absolute | mini | 128 | 500.0 | 2048 | 1.0 | 2.0 | 40.0% | 1 |' in md
  assert 'posjax 2.00x faster' in md
  assert 'failed: ValueError: boom' in md


def test_paired_timing_alternates_and_warms_up_both():
  calls = []
  ours, base = bench.paired(lambda: calls.append('b'), lambda: calls.append('o'), 3)
  assert calls == ['b', 'o'] + ['b', 'o'] * 3
  assert ours >= 0 and base >= 0


def test_one_real_measurement_and_unknown_variant():
  r, step = bench.bench_posjax('posjax bert tisa', 'bert', 'tiny,tisa', 16, 2, 'float32')
  step()
  assert r.flops > 0 and r.peak_bytes > 0 and r.compile_s > 0
  from posjax.errors import ConfigError
  with pytest.raises(ConfigError, match='absolute'):
    bench.parse(['--variants=absolute,nonsense'])


def test_bad_arguments_are_one_line(capsys):
  assert bench.main(['--sizes=huge']) == 2
  err = capsys.readouterr().err
  assert "unknown model size 'huge'" in err and 'Traceback' not in err
  assert bench.main(['--variants=tisaa']) == 2
  assert "unknown attention variant 'tisaa'" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_writes_json_and_markdown(tmp_path):
  assert bench.main(['--quick', f'--out={tmp_path}']) == 0
  assert (tmp_path / 'results.json').exists() and '| posjax bert tisa |' in (tmp_path / 'results.md').read_text()


def test_gpu_attention_script_smoke(tmp_path, capsys):
  """bench/gpu_attention.py on this CPU: --smoke measures the kernel (interpret mode) and the XLA path at a
  tiny shape and writes both tables; a full run off a GPU is one error line, exit 2."""
  import gpu_attention  # pylint: disable=g-import-not-at-top
  assert gpu_attention.main(['--smoke', '--out', str(tmp_path)]) == 0
  md = (tmp_path / 'results.md').read_text()
  assert '| 40 | kernel |' in md and '| 40 | xla |' in md
  assert gpu_attention.main(['--out', str(tmp_path / 'x')]) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith('error: bench/gpu_attention.py measures on')


def test_attention_memory_table_shows_fits_misses_and_failed_compiles():
  """bench/attention_memory.py's README table from constructed rows: ratios to absolute's with the same
  implementation, a step over HBM, and a compile that failed for another reason (a row, not a crash)."""
  import attention_memory as am  # pylint: disable=g-import-not-at-top
  from posjax.aot import topology  # pylint: disable=g-import-not-at-top
  gib = float(am.GiB)
  rows = [am.Row('train', 'absolute', 'xla', 512, 1, True, 1.0 * gib, 2.0 * gib, roofline_s=0.02),
          am.Row('train', 'absolute', 'pallas', 512, 1, True, 0.5 * gib, 1.5 * gib, roofline_s=0.01),
          am.Row('train', 'tisa', 'xla', 512, 1, False, 3.0 * gib),
          am.Row('train', 'tisa', 'pallas', 512, 1, True, 0.55 * gib, 1.55 * gib, roofline_s=0.01),
          am.Row('train', 'convq', 'pallas', 512, 1, note='compile failed: RESOURCE_EXHAUSTED')]
  md = am.markdown(rows, topology.parse('v5e:2x2'), 'base')
  assert '| 512 | 1 | absolute | 1.00 | 1.00 | 2.00 | 20.0 | 0.50 | 1.00 | 1.50 | 10.0 | 0.500 |' in md
  assert '| 512 | 1 | tisa | 3.00 (does not fit) | - | over HBM | - | 0.55 | 1.10 | 1.55 | 10.0 | 0.183 |' in md
  assert '| 512 | 1 | convq | - | - | - | - | compile failed | - | - | - | - |' in md
