"""Nothing lost to signals, a second run, or worker processes (each case a real train.py process):

- SIGINT (Ctrl-C) is a stop request like SIGTERM: a checkpoint, one log line, exit 0, no traceback;
- a signal before the first step has completed (set-up, compilation, a first step that never ends) ends the
  process at once, and so does a second signal;
- a second run on a workdir in use refuses at start naming the first; a killed run's lock blocks nothing;
- a SIGKILLed trainer's grain worker processes do not outlive it.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT
from test_preemption import env_with_cache, finalised_steps, logged_steps, run_until, train_cmd


def children(pid):
  """The pids whose parent is `pid` (from /proc)."""
  out = []
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          fields = f.read().rsplit(')', 1)[1].split()
      except OSError:
        continue
      if int(fields[1]) == pid:
        out.append(int(entry))
  return out


def alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return env_with_cache(tmp_path_factory.mktemp('cache'))


def test_sigint_saves_like_sigterm(tmp_path, env):
  code, err = run_until(train_cmd(tmp_path, 400, 1000), env, tmp_path, 5, signal.SIGINT)
  assert code == 0, err[-3000:]
  assert 'SIGINT received: wrote the checkpoint at step ' in err and 'Traceback' not in err
  stopped = int(err.split('SIGINT received: wrote the checkpoint at step ')[1].split()[0])
  assert finalised_steps(tmp_path) == [stopped]


def test_a_signal_during_compilation_stops_at_once(tmp_path, env):
  # A fresh compilation cache: the first step compiles for seconds, and the signal lands inside it.
  env = {**env, 'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'no-cache')}
  proc = subprocess.Popen(train_cmd(tmp_path, 400, 1000), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  err = ''
  try:
    deadline = time.time() + 300
    while 'initialised' not in err and proc.poll() is None and time.time() < deadline:
      err += proc.stderr.readline()
    assert 'initialised' in err, err[-3000:]  # the train state exists; the step is compiling
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=60)
    took = time.time() - start
  finally:
    if proc.poll() is None:
      proc.kill()
  err += rest
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert 'SIGTERM received before the first step completed' in err and 'Traceback' not in err
  assert took < 20, took
  assert not finalised_steps(tmp_path) and logged_steps(tmp_path) == 0


def test_a_second_signal_stops_without_waiting_for_the_step():
  """Armed (a step has run), the first SIGTERM waits for the step's end; a step that never ends is cut short by
  the second."""
  code = ('import time\nfrom posjax.training import preemption\nwith preemption.StopRequest() as stop:\n'
          '  stop.arm()\n  print("armed", flush=True)\n  time.sleep(120)\n  print("step ended", flush=True)\n')
  proc = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'armed'
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert proc.poll() is None  # the first one only asked
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM and time.time() - start < 5
  assert 'SIGTERM received a second time' in err and 'step ended' not in out and 'Traceback' not in err


def test_a_second_run_on_the_workdir_refuses_and_a_killed_one_blocks_nothing(tmp_path, env):
  cmd = train_cmd(tmp_path, 4000, 20)
  first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while logged_steps(tmp_path) < 2:
      assert first.poll() is None and time.time() < deadline
      time.sleep(0.01)
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: workdir '{tmp_path}' is in use by another run (pid {first.pid} on "), last
    first.kill()
    first.wait()
  finally:
    if first.poll() is None:
      first.kill()
  # The killed run's lock file is still there; the kernel released its lock with the process.
  assert os.path.exists(tmp_path / 'posjax.lock')
  code, err = run_until(cmd, env, tmp_path, logged_steps(tmp_path) + 2, signal.SIGTERM)
  assert code == 0 and 'wrote the checkpoint at step' in err, err[-3000:]


def test_grain_workers_die_with_a_killed_trainer(tmp_path, env):
  proc = subprocess.Popen(train_cmd(tmp_path, 4000, 100000, ['--config.data.worker_count=2']), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while logged_steps(tmp_path) < 2:
      assert proc.poll() is None and time.time() < deadline
      time.sleep(0.01)
    kids = children(proc.pid)
    assert len(kids) >= 2, kids  # the two workers (and multiprocessing's resource tracker)
    proc.kill()
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  deadline = time.time() + 20
  while any(alive(k) for k in kids) and time.time() < deadline:
    time.sleep(0.2)
  assert not [k for k in kids if alive(k)]
