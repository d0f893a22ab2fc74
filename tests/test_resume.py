"""Killing a sweep at any moment loses nothing and changes nothing.

Each test drives the real binary in a subprocess on a tiny study (K = 1, 2 on
the synthetic task, random base), kills it mid-run, reruns the same command
and compares with an uninterrupted run: the cells, the per-step losses and the
final factors must be bitwise equal.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (
    '--config=experiments/configs/paper82.py:smoke',
    '--config.data.source=synthetic',
    '--config.base.kind=random',
    '--config.model.d_model=16',
    '--config.model.d_mlp=32',
    '--config.model.n_heads=2',
    '--config.model.max_len=16',
    '--config.data.seq_len=16',
    '--config.data.max_prompt_tokens=8',
    '--config.studies.budget_matched.ranks=(1,2)',
    '--config.studies.budget_multipliers.enabled=False',
    '--config.studies.crossover.enabled=False',
    '--config.studies.flops_matched.enabled=False',
    '--config.studies.wallclock_matched.enabled=False',
    '--config.budget.anchor_rank=2',
    '--config.budget.anchor_steps=60',
    '--config.train.chunk_steps=5',
    '--config.train.checkpoint_every_chunks=1',
)


def sweep_command(workdir, cache_dir):
  return [
      sys.executable,
      '-m',
      'experiments.k_budget_sweep',
      f'--workdir={workdir}',
      *TINY,
      f'--config.train.cache_dir={cache_dir}',
  ]


def run_sweep(workdir, cache_dir):
  proc = subprocess.run(
      sweep_command(workdir, cache_dir),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def wait_for_checkpoint(workdir, proc, timeout=300):
  """Blocks until the K=1 run has a finished checkpoint step."""
  ckpt = os.path.join(workdir, 'checkpoints', 'K1_steps120')
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt)):
      return
    assert proc.poll() is None, 'the sweep ended before its first checkpoint'
    time.sleep(0.05)
  raise AssertionError('no checkpoint appeared')


def factors(workdir, run_id):
  """The latest saved state of a run, restored onto this process's device.

  The sweep may have split its lanes over several CPU devices
  (train.cpu_devices), so the target says where the arrays go.
  """
  import jax  # pylint: disable=g-import-not-at-top

  directory = os.path.join(workdir, 'checkpoints', run_id)
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  handlers = dict(state=ocp.StandardCheckpointHandler())
  with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
    step = manager.latest_step()
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
        manager.item_metadata(step)['state'],
    )
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    state = manager.restore(step, args=args)['state']
  return step, state


def comparable(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  keys = ('study', 'K', 'steps', 'final_eval_loss', 'final_train_loss')
  cells = [{k: c[k] for k in keys} for c in results['cells']]
  return cells, results['curves']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('cache'))
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  run_sweep(workdir, cache)
  return workdir, cache


def assert_same_as(workdir, reference):
  assert comparable(workdir) == comparable(reference)
  for run_id in ('K1_steps120', 'K2_steps60'):
    step_a, state_a = factors(workdir, run_id)
    step_b, state_b = factors(reference, run_id)
    assert step_a == step_b
    flat_a = {str(p): v for p, v in _leaves(state_a)}
    flat_b = {str(p): v for p, v in _leaves(state_b)}
    assert flat_a.keys() == flat_b.keys()
    for path, value in flat_a.items():
      np.testing.assert_array_equal(value, flat_b[path], err_msg=path)


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top

  return jax.tree_util.tree_flatten_with_path(tree)[0]


def test_sigkill_mid_run_then_resume_is_bitwise_equal(uninterrupted, tmp_path):
  reference, cache = uninterrupted
  workdir = str(tmp_path / 'killed')
  proc = subprocess.Popen(
      sweep_command(workdir, cache),
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  wait_for_checkpoint(workdir, proc)
  time.sleep(random.Random().uniform(0.0, 0.5))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  resumed = run_sweep(workdir, cache)
  assert 'resuming from the checkpoint' in resumed.stderr
  assert_same_as(workdir, reference)


def test_sigterm_checkpoints_and_exits_75_then_resumes(uninterrupted, tmp_path):
  reference, cache = uninterrupted
  workdir = str(tmp_path / 'preempted')
  proc = subprocess.Popen(
      sweep_command(workdir, cache),
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  wait_for_checkpoint(workdir, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 75, stderr[-2000:]
  assert 'preempted: stopped at step' in stderr
  assert 'Traceback' not in stderr
  run_sweep(workdir, cache)
  assert_same_as(workdir, reference)
  with open(os.path.join(workdir, 'manifest.json')) as f:
    record = json.load(f)['runs']['K1_steps120']
  assert len(record['train_loss']) == 120  # no step twice, none skipped


def test_rerun_of_finished_sweep_trains_nothing(uninterrupted):
  reference, cache = uninterrupted
  before = comparable(reference)
  proc = run_sweep(reference, cache)
  assert proc.stderr.count('finished earlier; skipping') == 2
  assert comparable(reference) == before
