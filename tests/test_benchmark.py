"""Tests of the benchmark: the engine and a per-step jit loop agree.

One tiny benchmark runs for the whole module: a 16-wide model, K in {1, 2},
2 seeds, and crossover cells that make each K's run evaluate at two step
counts, so prefix sharing is exercised. The per-step loop shares no code path
with the engine's vmap, scan, chunking and batched eval, so matching losses
say both train the same model on the same data.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ctsft_jax import benchmark
from ctsft_jax import budget as budget_lib
from ctsft_jax import errors
from ctsft_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-4
# (K, steps) points: budget K=1 x 8, K=2 x 4; crossover K=2 x {2, 4} paired
# with K=1 x {4, 8}.
CELLS = {(1, 4), (1, 8), (2, 2), (2, 4)}
SHARED_STEPS, UNSHARED_STEPS = 8 + 4, (4 + 8) + (2 + 4)  # per lane


def _tiny_benchmark_config(make_config):
  config = make_config(
      train__chunk_steps=3,  # runs cross chunk boundaries
      optim__learning_rate=1e-2,  # losses move far beyond the tolerance
      studies__crossover__enabled=True,
      studies__crossover__high_rank=2,
      studies__crossover__low_rank=1,
      studies__crossover__high_steps=(2, 4),
  )
  config.unlock()
  config.benchmark = benchmark.default_settings()
  config.benchmark.rtol = RTOL
  config.benchmark.scaling_seeds = (2,)  # reuses the compiled programs
  config.benchmark.scaling_steps = 2
  config.benchmark.matmul_sizes = (32, 64)
  config.benchmark.matmul_min_s = 0.01
  config.lock()
  return config


@pytest.fixture(scope='module')
def tiny_run(make_config, tmp_path_factory):
  """(workdir, result) of one tiny benchmark."""
  workdir = str(tmp_path_factory.mktemp('bench'))
  config = _tiny_benchmark_config(make_config)
  return workdir, benchmark.run_benchmark(config, workdir)


def test_engine_and_loop_give_the_same_per_seed_losses(tiny_run):
  _, result = tiny_run
  cells = result['agreement']['cells']
  assert {(c['K'], c['steps']) for c in cells} == CELLS
  for c in cells:
    plain = np.asarray(c['straightforward'], np.float64)
    assert plain.shape == (2,) and np.all(np.isfinite(plain))
    np.testing.assert_allclose(c['engine'], plain, rtol=RTOL, atol=0)
    np.testing.assert_allclose(c['engine_unshared'], plain, rtol=RTOL, atol=0)
  assert result['agreement']['within_rtol']
  assert result['agreement']['max_rel_diff'] <= RTOL


def test_the_losses_compared_are_far_apart_beyond_the_tolerance(tiny_run):
  """Training, the seed and K each move the loss by much more than rtol."""
  _, result = tiny_run
  by_cell = {
      (c['K'], c['steps']): np.asarray(c['straightforward'])
      for c in result['agreement']['cells']
  }
  base = result['base_eval_loss']
  gap = 100 * RTOL * base
  for losses in by_cell.values():
    assert np.all(base - losses > gap)  # trained, and downhill
  for seed_a, seed_b in by_cell.values():
    assert abs(seed_a - seed_b) > 10 * RTOL * base
  assert np.all(np.abs(by_cell[1, 4] - by_cell[2, 4]) > 10 * RTOL * base)


def test_prefix_sharing_does_not_change_the_losses(tiny_run):
  _, result = tiny_run
  assert result['agreement']['prefix_sharing_max_abs_diff'] == 0.0


def test_json_holds_the_required_keys_with_sane_values(tiny_run):
  workdir, _ = tiny_run
  with open(os.path.join(workdir, 'benchmark.json')) as f:
    result = json.load(f)
  for key in (
      'speedup_vs_straightforward',
      'speedup_same_cells',
      'utilisation',
  ):
    assert np.isfinite(result[key]) and result[key] > 0, key
  assert set(result['compile_s_per_K']) == {'1', '2'}
  assert all(s > 0 for s in result['compile_s_per_K'].values())
  assert result['peak_rss_bytes'] > 10 * 2**20
  assert result['seeds'] == [0, 1]
  assert {(c['K'], c['steps']) for c in result['cells']} == CELLS
  assert result['environment']['backend'] == jax.default_backend()
  assert result['devices']
  assert result['persistent_cache_hits'] == 0
  assert result['engine']['seed_steps'] == 2 * SHARED_STEPS
  assert result['engine_unshared']['seed_steps'] == 2 * UNSHARED_STEPS
  assert result['straightforward']['seed_steps'] == 2 * UNSHARED_STEPS
  peak = result['machine']['f32']['peak_gflop_per_s']
  assert peak == max(
      s['gflop_per_s'] for s in result['machine']['f32']['sizes']
  )
  assert result['peak_f32_gflop_per_s'] == peak
  timed = [s for s in result['machine']['f32']['sizes'] if 'calls' in s]
  assert {s['when'] for s in timed} == {'before', 'after'}
  # A row's rate is its fastest timing window: never below the mean.
  assert all(s['gflop_per_s'] >= s['gflop_per_s_mean'] for s in timed)
  assert [r['seeds'] for r in result['scaling']['seeds']] == [2]
  assert [r['K'] for r in result['scaling']['ranks']] == [1, 2]


def test_utilisation_is_xla_flops_over_train_seconds_and_peak(tiny_run):
  """Recomputed from the per-K rows: XLA FLOPs x seed-steps / s / peak."""
  _, result = tiny_run
  engine, per_k = result['engine'], result['flops_per_seed_step']
  flops = len(result['seeds']) * sum(
      per_k[k]['xla_engine'] * r['steps'] for k, r in engine['per_K'].items()
  )
  peak = result['machine']['f32']['peak_gflop_per_s'] * 1e9
  assert result['utilisation'] == pytest.approx(
      flops / engine['train_s'] / peak, rel=1e-9
  )
  # One count of the work for every way: the engine's, per seed-step.
  for k, row in per_k.items():
    assert row['xla_engine'] == pytest.approx(
        row['xla_straightforward'], rel=0.05
    ), k


def test_markdown_shows_every_target_with_a_verdict(tiny_run):
  workdir, result = tiny_run
  with open(os.path.join(workdir, 'benchmark.md')) as f:
    text = f.read()
  assert len(result['targets']) == 4
  for target in result['targets']:
    row = next(
        l for l in text.splitlines() if l.startswith(f"| {target['name']}")
    )
    assert row.rstrip(' |').endswith(('pass', 'miss'))


def test_compilation_cache_is_off_inside_and_restored_after(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', str(tmp_path))
  try:
    with benchmark.compilation_cache_off():
      assert jax.config.jax_compilation_cache_dir is None
      assert not jax.config.jax_enable_compilation_cache
    assert jax.config.jax_compilation_cache_dir == str(tmp_path)
  finally:
    jax.config.update('jax_compilation_cache_dir', before)


def test_unshared_runs_are_one_per_distinct_cell(make_config):
  config = make_config(
      studies__crossover__enabled=True,
      studies__crossover__high_rank=2,
      studies__crossover__low_rank=1,
      studies__crossover__high_steps=(2, 4),
  )
  plan = sweep.make_plan(config)
  assert plan.prefix_shared
  runs = benchmark.unshared_runs(plan)
  assert runs == {
      1: (budget_lib.Run(1, 4, (4,)), budget_lib.Run(1, 8, (8,))),
      2: (budget_lib.Run(2, 2, (2,)), budget_lib.Run(2, 4, (4,))),
  }


def test_matmul_throughput_skips_sizes_predicted_too_slow():
  out = benchmark.matmul_throughput(
      np.float32, (16, 4096), min_seconds=0.01, max_call_seconds=1e-9
  )
  first, second = out['sizes']
  assert first['n'] == 16 and first['gflop_per_s'] > 0
  assert second == dict(n=4096, devices=1, skipped='predicted too slow')
  assert out['peak_gflop_per_s'] == first['gflop_per_s']


def test_loop_with_autodiff_factor_grads_gives_the_same_losses(
    make_config, tmp_path
):
  """The loop can use a first implementation's gradients; same training."""
  config = _tiny_benchmark_config(make_config)
  ctx = sweep.prepare(config, str(tmp_path))
  runs = {2: benchmark.unshared_runs(ctx.plan)[2]}
  custom = benchmark.loop_pass(ctx, runs)['losses']
  autodiff = benchmark.loop_pass(ctx, runs, 'autodiff')['losses']
  assert custom.keys() == autodiff.keys() == {'2:2', '2:4'}
  for key in custom:
    np.testing.assert_allclose(custom[key], autodiff[key], rtol=RTOL)
  assert not np.allclose(custom['2:2'], custom['2:4'], rtol=RTOL)


def test_markdown_names_the_loops_model_code(tiny_run):
  _, result = tiny_run
  assert 'same model code as the engine' in benchmark.markdown(result)
  other = dict(result, settings=dict(result['settings']))
  other['settings']['loop_factor_grad'] = 'autodiff'
  assert 'model.factor_grad=autodiff' in benchmark.markdown(other)


@pytest.mark.parametrize(
    'key,value',
    [
        ('rtol', 0.0),
        ('scaling_seeds', (0, 2)),
        ('matmul_sizes', ()),
        ('loop_factor_grad', 'fused'),
    ],
)
def test_bad_settings_name_the_key(key, value):
  settings = benchmark.default_settings()
  settings[key] = value
  with pytest.raises(errors.UserError, match=f'benchmark.{key}='):
    benchmark.check_settings(settings)


def _run_binary(workdir, *flags, timeout):
  return subprocess.run(
      [
          sys.executable,
          '-m',
          'experiments.benchmark',
          f'--workdir={workdir}',
          *flags,
      ],
      cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


def test_binary_reports_a_bad_setting_in_one_line(tmp_path):
  proc = _run_binary(
      tmp_path / 'work', '--config.benchmark.rtol=-1', timeout=120
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors_ = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert errors_ == ['error: benchmark.rtol=-1.0 must be > 0']
  assert 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_binary_smoke_run_writes_both_files(tmp_path):
  workdir = tmp_path / 'work'
  proc = _run_binary(
      workdir,
      '--config=experiments/configs/benchmark.py:smoke',
      f'--config.train.cache_dir={tmp_path / "cache"}',
      timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(workdir / 'benchmark.json') as f:
    result = json.load(f)
  assert result['agreement']['within_rtol']
  assert (workdir / 'benchmark.md').read_text().startswith('# Benchmark')


ONE_DEVICE_SCRIPT = """
import json, sys
import jax
sys.path.insert(0, 'tests')
from conftest import tiny_config
from ctsft_jax import benchmark, sweep

config = tiny_config(train__compilation_cache_dir='none')
config.unlock()
config.train.cache_dir = sys.argv[1]
ctx = sweep.prepare(config, sys.argv[1] + '/work')

def devices_of(ctx):
  progs = benchmark.compile_loop(ctx, 1)
  params, _ = progs.init(jax.random.key(0))
  return len(jax.tree.leaves(params)[0].sharding.device_set), len(
      progs.step.output_shardings[0]['head']['a'].device_set)

print('RESULT' + json.dumps(dict(
    devices=jax.device_count(),
    sweep=devices_of(ctx),
    loop=devices_of(benchmark.on_one_device(ctx)),
    lanes=list(benchmark.on_one_device(ctx).lanes) == list(ctx.lanes))))
"""


def test_the_loop_runs_on_one_device_of_a_split_host(tmp_path):
  """On a host split into devices, the sweep's replicated inputs would make
  the loop compute every step once per device; on_one_device stops that."""
  proc = subprocess.run(
      [sys.executable, '-c', ONE_DEVICE_SCRIPT, str(tmp_path)],
      cwd=ROOT,
      env=dict(
          os.environ,
          JAX_PLATFORMS='cpu',
          XLA_FLAGS='--xla_force_host_platform_device_count=2',
      ),
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')][-1]
  out = json.loads(line[len('RESULT') :])
  assert out['devices'] == 2
  assert out['sweep'] == [1, 2]  # the sweep's context: step replicated on 2
  assert out['loop'] == [1, 1]  # the loop's own context: one device
  assert out['lanes']
