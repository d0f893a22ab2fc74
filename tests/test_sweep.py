"""End-to-end tests of the sweep binary, run as a user runs it.

Most tests start `python -m experiments.k_budget_sweep` in a subprocess on a
tiny config (16-wide model, K in {1, 2}, synthetic data, random base) and
check the files it writes, its exit status and its stderr. Config checks that
stop before any work call `sweep.run_sweep` in-process instead.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from ctsft_jax import errors
from ctsft_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'experiments/configs/paper82.py:smoke'
# Every study on, shrunk: K=1 gets 8 steps and K=2 4 steps at the budget
# (500 and 1,000 trainable params, anchor K=2 x 4 steps).
TINY = {
    'model.d_model': '16',
    'model.n_heads': '2',
    'model.d_mlp': '32',
    'model.max_len': '16',
    'data.source': 'synthetic',
    'data.seq_len': '16',
    'data.max_prompt_tokens': '8',
    'data.synthetic_examples': '200',
    'data.max_eval_examples': '32',
    'base.kind': 'random',
    'train.eval_batch': '16',
    'train.chunk_steps': '8',
    'studies.budget_matched.ranks': '(1,2)',
    'budget.anchor_rank': '2',
    'budget.anchor_steps': '4',
    'studies.crossover.high_rank': '2',
    'studies.crossover.low_rank': '1',
    'studies.crossover.high_steps': '(2,4)',
    'studies.wallclock_matched.calibration_steps': '2',
}


def tiny_flags(**changes) -> list[str]:
  """--config.* flags of TINY with `changes` ('__' for '.'), each key once.

  A key must not be given twice: repeated tuple flags are merged, not
  replaced, by ml_collections.
  """
  values = dict(TINY, **{k.replace('__', '.'): v for k, v in changes.items()})
  return [f'--config.{key}={value}' for key, value in values.items()]


TINY_FLAGS = tuple(tiny_flags())
TINY_STEPS = {1: 8, 2: 4}


def run_binary(workdir, cache_dir, *flags, timeout=300):
  """Runs the sweep binary; returns the CompletedProcess (text output)."""
  command = [
      sys.executable,
      '-m',
      'experiments.k_budget_sweep',
      f'--config={CONFIG}',
      f'--workdir={workdir}',
      f'--config.train.cache_dir={cache_dir}',
      *flags,
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
      command,
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


def _assert_ok(proc):
  assert proc.returncode == 0, proc.stderr[-4000:]


def _read_json(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


def _user_error_lines(proc) -> list[str]:
  """The lines of stderr that report a user error (not absl log lines)."""
  lines = proc.stderr.splitlines()
  return [line for line in lines if line.startswith('error:')]


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('cache'))


@pytest.fixture(scope='module')
def tiny_sweep(tmp_path_factory, cache_dir):
  """One finished tiny sweep: (workdir, process). Tests copy, never edit."""
  workdir = str(tmp_path_factory.mktemp('sweep') / 'work')
  proc = run_binary(workdir, cache_dir, *TINY_FLAGS)
  _assert_ok(proc)
  return workdir, proc


def _copy(tiny_sweep, tmp_path) -> str:
  workdir = str(tmp_path / 'work')
  shutil.copytree(tiny_sweep[0], workdir)
  return workdir


def test_every_artifact_is_written(tiny_sweep):
  workdir, _ = tiny_sweep
  for name in (
      'config.json',
      'results.json',
      'report.md',
      'loss_vs_k.png',
      'manifest.json',
  ):
    path = os.path.join(workdir, name)
    assert os.path.isfile(path) and os.path.getsize(path) > 0, name
  with open(os.path.join(workdir, 'loss_vs_k.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  runs = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  assert {r.split('_')[0] for r in runs} == {'K1', 'K2'}
  for run in runs:
    assert os.listdir(os.path.join(workdir, 'checkpoints', run)), run
  with open(os.path.join(workdir, 'report.md')) as f:
    report = f.read()
  assert '## Setup' in report and 'loss_vs_k.png' in report


def test_config_json_is_the_resolved_config(tiny_sweep):
  config = _read_json(tiny_sweep[0], 'config.json')
  assert config['model']['d_model'] == 16
  assert config['data']['source'] == 'synthetic'
  assert list(config['studies']['budget_matched']['ranks']) == [1, 2]


def test_results_schema(tiny_sweep):
  results = _read_json(tiny_sweep[0], 'results.json')
  matched = [c for c in results['cells'] if c['study'] == 'budget_matched']
  assert {c['K']: c['steps'] for c in matched} == TINY_STEPS
  for cell in results['cells']:
    assert cell['trainable_params'] == 500 * cell['K']
    assert cell['param_steps'] == cell['trainable_params'] * cell['steps']
    for key in ('final_eval_loss', 'final_train_loss'):
      values = cell[key]
      assert isinstance(values, list) and len(values) == 2, (key, cell)
      assert all(isinstance(v, float) and v > 0 for v in values), cell
  studies = {c['study'] for c in results['cells']}
  assert {'budget_matched', 'budget_multipliers', 'crossover'} <= studies
  env = results['environment']
  for package in ('jax', 'jaxlib', 'flax'):
    assert env['packages'][package], package
  assert env['backend'] == 'cpu'
  assert env['device_count'] >= 1
  data = results['data']
  assert data['source'] == 'synthetic'
  assert data['n_train'] > 0 and data['n_eval'] > 0
  assert len(data['sha256']) == 64
  int(data['sha256'], 16)
  assert results['seeds'] == [0, 1]


def test_rerun_resumes_without_training(tiny_sweep, cache_dir, tmp_path):
  workdir = _copy(tiny_sweep, tmp_path)
  before = _read_json(workdir, 'results.json')
  proc = run_binary(workdir, cache_dir, *TINY_FLAGS)
  _assert_ok(proc)
  for run_id in _read_json(workdir, 'manifest.json')['runs']:
    assert f'{run_id} finished earlier' in proc.stderr, run_id
  assert ': step ' not in proc.stderr  # no progress line: nothing trained
  assert 'compiled init' not in proc.stderr
  after = _read_json(workdir, 'results.json')
  assert after['cells'] == before['cells']
  assert after['setup'] == before['setup']


@pytest.mark.slow
def test_rerun_with_wallclock_cells_compiles_nothing(cache_dir, tmp_path):
  """The rerun plans with the stored calibration before compiling."""
  # param-steps give each K 1 step; the wall-clock anchor (K=2 x 4 steps)
  # then always lengthens K=2's run to 4 steps.
  flags = tiny_flags(
      budget__param_steps='500',
      studies__budget_multipliers__enabled='false',
      studies__crossover__enabled='false',
      studies__flops_matched__enabled='false',
  )
  workdir = str(tmp_path / 'work')
  _assert_ok(run_binary(workdir, cache_dir, *flags))
  assert 'K2_steps4' in _read_json(workdir, 'manifest.json')['runs']
  proc = run_binary(workdir, cache_dir, *flags)
  _assert_ok(proc)
  assert 'finished earlier' in proc.stderr
  assert 'compiled init' not in proc.stderr


@pytest.mark.slow  # tests/test_resume.py kills and resumes in the default run
def test_unfinished_run_resumes_from_its_checkpoint(
    tiny_sweep, cache_dir, tmp_path
):
  """Forget the K=2 run and its last checkpoint: the rerun trains the rest
  and lands on the same losses as the uninterrupted run."""
  workdir = _copy(tiny_sweep, tmp_path)
  before = _read_json(workdir, 'results.json')
  manifest = _read_json(workdir, 'manifest.json')
  (run_id,) = [r for r in manifest['runs'] if r.startswith('K2_')]
  del manifest['runs'][run_id]
  with open(os.path.join(workdir, 'manifest.json'), 'w') as f:
    json.dump(manifest, f)
  run_dir = os.path.join(workdir, 'checkpoints', run_id)
  steps = sorted(int(s) for s in os.listdir(run_dir) if s.isdigit())
  assert len(steps) >= 2, steps
  shutil.rmtree(os.path.join(run_dir, str(steps[-1])))
  proc = run_binary(workdir, cache_dir, *TINY_FLAGS)
  _assert_ok(proc)
  assert f'resuming from the checkpoint at step {steps[-2]}' in proc.stderr
  after = _read_json(workdir, 'results.json')
  for old, new in zip(before['cells'], after['cells']):
    assert (old['study'], old['K'], old['steps']) == (
        new['study'],
        new['K'],
        new['steps'],
    )
    assert new['final_eval_loss'] == pytest.approx(
        old['final_eval_loss'], rel=1e-5
    )
    assert new['final_train_loss'] == pytest.approx(
        old['final_train_loss'], rel=1e-5
    )


def test_other_config_is_refused_then_overwritten(
    tiny_sweep, cache_dir, tmp_path
):
  workdir = _copy(tiny_sweep, tmp_path)
  proc = run_binary(workdir, cache_dir, *tiny_flags(seed='7'))
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  (line,) = _user_error_lines(proc)
  assert 'seed' in line and '--overwrite' in line
  assert 'seeds' not in line and 'd_model' not in line
  assert _read_json(workdir, 'config.json')['seed'] == 0
  # Overwrite with a sweep of K=2 alone (one compile instead of two).
  only_k2 = tiny_flags(
      seed='7',
      studies__budget_matched__ranks='(2,)',
      studies__crossover__enabled='false',
  )
  proc = run_binary(workdir, cache_dir, *only_k2, '--overwrite')
  _assert_ok(proc)
  assert _read_json(workdir, 'config.json')['seed'] == 7
  results = _read_json(workdir, 'results.json')
  assert results['seeds'] == [7, 8]
  assert {c['K'] for c in results['cells']} == {2}
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['K2_steps32']


def test_bad_value_exits_2_with_one_line(tmp_path, cache_dir):
  workdir = str(tmp_path / 'work')
  proc = run_binary(workdir, cache_dir, *tiny_flags(seeds='0'))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  (line,) = _user_error_lines(proc)
  assert 'seeds=0' in line


@pytest.mark.parametrize(
    'change, named',
    [
        (dict(studies__budget_matched__ranks=(1, 99)), 'K=99'),
        (dict(lowrank__scaling='bogus'), 'bogus'),
        (dict(model__attention='flash'), 'model.attention'),
        (dict(model__factor_grad='fused'), 'model.factor_grad'),
        (dict(train__cpu_devices=-1), 'train.cpu_devices'),
        (dict(budget__param_steps=300), 'K=2'),
    ],
)
def test_bad_value_is_one_line_user_error(tmp_path, make_config, change, named):
  config = make_config(
      train__cache_dir=str(tmp_path / 'cache'),
      train__compilation_cache_dir='none',
      **change,
  )
  with pytest.raises(errors.UserError, match=named) as info:
    sweep.run_sweep(config, str(tmp_path / 'work'))
  assert '\n' not in str(info.value)


def test_rejected_config_leaves_the_workdir_reusable(tmp_path, make_config):
  """Validation runs before the workdir is written, so the corrected
  command is not refused as a different config."""
  workdir = str(tmp_path / 'work')
  config = make_config(
      seeds=0,
      train__cache_dir=str(tmp_path / 'cache'),
      train__compilation_cache_dir='none',
  )
  with pytest.raises(errors.UserError, match='seeds=0'):
    sweep.run_sweep(config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'config.json'))


def test_workdir_written_before_a_key_was_added_still_matches(
    tmp_path, make_config
):
  """A stored config without a later key matches when the key has the value
  that stands for the old behaviour, and differs otherwise."""
  workdir = str(tmp_path / 'work')
  config = make_config()
  stored = json.loads(json.dumps(config.to_dict()))
  del stored['model']['factor_grad']
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(stored, f)
  sweep.check_workdir(config, workdir, overwrite=False)  # custom: matches
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(stored, f)
  config.model.factor_grad = 'autodiff'
  with pytest.raises(errors.UserError, match='model.factor_grad'):
    sweep.check_workdir(config, workdir, overwrite=False)


@pytest.mark.slow
def test_smoke_config_with_stdlib_data_and_pretrained_base(tmp_path):
  """The documented smoke command as is: stdlib data, base pretraining."""
  workdir, cache = str(tmp_path / 'work'), str(tmp_path / 'cache')
  proc = run_binary(workdir, cache, timeout=1800)
  _assert_ok(proc)
  results = _read_json(workdir, 'results.json')
  matched = [c for c in results['cells'] if c['study'] == 'budget_matched']
  assert {c['K']: c['steps'] for c in matched} == {
      2: 640,
      4: 320,
      8: 160,
      16: 80,
      32: 40,
      64: 20,
  }
  assert results['data']['source'] == 'stdlib'
  assert results['base']['kind'] == 'pretrained'
  # Tuning lowers the loss of the pretrained base on held-out functions.
  for cell in matched:
    assert max(cell['final_eval_loss']) < results['base_eval_loss']


def test_lr_grid_picks_each_cells_rate_on_the_selection_half(
    cache_dir, tmp_path
):
  """A grid of a sane and an absurd rate: every cell must pick the sane one.

  The absurd rate (50) wrecks the factors within a few steps, so its
  selection-half loss is far higher; the cells then report the sane rate's
  seeds on the report half, which differ from the untuned full-set losses.
  """
  flags = tiny_flags(optim__lr_grid='(0.001,50.0)')
  workdir = str(tmp_path / 'grid')
  _assert_ok(run_binary(workdir, cache_dir, *flags))
  results = _read_json(workdir, 'results.json')
  assert results['learning_rates'] == [0.001, 50.0]
  assert results['lr_tuned_per_cell'] is True
  assert len(results['lanes']) == 2 * len(results['seeds'])
  for cell in results['cells']:
    assert cell['lr'] == 0.001, cell
    chosen = cell['lr_selection_loss']
    assert chosen['0.001'] < chosen['50.0']
    assert len(cell['final_eval_loss']) == len(results['seeds'])
  assert 'Tuned per cell over the grid' in _read_text(workdir, 'report.md')


def _read_text(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return f.read()


def test_only_process_zero_writes_the_workdir_files(
    tmp_path, make_config, monkeypatch
):
  """A multi-host job's other processes save checkpoints and nothing else."""
  from ctsft_jax import environment  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(environment, 'is_writer', lambda: False)
  workdir = str(tmp_path / 'work')
  config = make_config(
      train__cache_dir=str(tmp_path / 'cache'),
      train__compilation_cache_dir='none',
  )
  sweep.run_sweep(config, workdir)
  assert sorted(os.listdir(workdir)) == ['checkpoints']
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [
      'K1_steps8',
      'K2_steps4',
  ]
