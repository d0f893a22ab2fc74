"""How fast the sweep engine runs a study, against a plain loop and the chip.

Three measurements, in one process, on the same cells, seeds and data:

  engine          what `sweep` runs: one compiled program per K that trains
                  every lane at once (vmap over lanes, scan over steps), driven
                  in chunks by `train.advance`, evaluated with the compiled
                  eval at every cell's step count. Timed twice: with prefix
                  sharing where the schedule allows it (one run per K, as the
                  sweep plans it) and without (one run per distinct (K, steps)
                  cell, the same work as the loop below).
  straightforward what a researcher writes first: a `jax.jit` train step of
                  the same `Task.loss`, optimizer, schedule, batches and init,
                  called from a Python loop, one seed after another, one run
                  per cell, and a jitted eval at the end of each cell.
  machine limit   dense matmul throughput at several sizes, float32 and
                  bfloat16.

Compile time is measured with the persistent compilation cache off, and is
reported both apart and included. The engine writes no checkpoints here, so
the numbers are training, evaluation and compilation only. Both ways must
give the same per-seed eval losses up to float rounding (`settings.rtol`).
The engine also holds a lane whose loss goes non-finite and the loop does
not, so a diverging lane would be reported as a disagreement.

On a CPU host the sweep splits the host into one JAX device per core
(`environment.split_cpu_host`) and the engine's lanes are spread over them.
The straightforward loop runs on the first device alone (`on_one_device`),
with its inputs there, as in a user's unsplit process: its step takes the
same time there as in a process with one device, because XLA's CPU backend
still runs that one program's large operations on every core. The scaling
table shows the engine's seconds per seed-step against the number of lanes
and devices.
"""

import contextlib
import dataclasses
import os
import resource
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ctsft_jax import budget as budget_lib
from ctsft_jax import checkpoint
from ctsft_jax import environment
from ctsft_jax import errors
from ctsft_jax import optim
from ctsft_jax import sweep
from ctsft_jax import train as train_lib
from ctsft_jax import validate

CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'
# Targets the engine is judged against in benchmark.md (not enforced).
TARGET_SPEEDUP = 3.0  # engine (whole study, compile included) vs the loop
TARGET_UTILISATION = 0.4  # model FLOP/s while training / f32 matmul peak
TARGET_COMPILE_S = 10.0  # seconds to compile one K (init, chunk, eval)
TARGET_RSS_BYTES = 2 * 1024**3  # peak resident memory of the process


def default_settings() -> ml_collections.ConfigDict:
  """The `benchmark` section of a config; used when a config has none."""
  s = ml_collections.ConfigDict()
  s.straightforward = True  # also time the per-step jit loop (the baseline)
  # The loop's model.factor_grad: '' = the engine's (the loop differs only
  # in how it runs the steps); 'autodiff' = JAX differentiates the factor
  # product, as a first implementation of the layer would.
  s.loop_factor_grad = ''
  s.rtol = 1e-4  # relative tolerance of engine vs loop eval losses
  s.scaling_rank = 0  # K of the seeds table; 0 = the K with the most steps
  s.scaling_seeds = (1, 2, 4, 8, 16)  # lane counts of the seeds table
  s.scaling_steps = 10  # timed steps per point of the scaling tables
  s.matmul_sizes = (512, 1024, 2048)  # n of the n x n x n matmuls
  s.matmul_min_s = 0.5  # seconds of repeated matmuls timed per size
  s.matmul_max_call_s = 2.0  # skip a size predicted to take longer per call
  return s


def settings_of(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  settings = default_settings()
  if 'benchmark' in config:
    settings.update(config.benchmark)
  return settings


@contextlib.contextmanager
def compilation_cache_off():
  """Turns the persistent compilation cache off; restores it on exit."""
  names = ('jax_enable_compilation_cache', 'jax_compilation_cache_dir')
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update('jax_enable_compilation_cache', False)
  jax.config.update('jax_compilation_cache_dir', None)
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)


class _CacheHits:
  """Counts persistent-cache hits (there should be none) while registered."""

  def __init__(self):
    self.count = 0

  def __call__(self, event: str, **kwargs) -> None:
    del kwargs
    if event == CACHE_HIT_EVENT:
      self.count += 1


def unshared_runs(plan: budget_lib.Plan) -> dict:
  """One run per distinct (K, steps) cell: the plan without prefix sharing."""
  return {
      k: tuple(
          budget_lib.Run(k, s, (s,))
          for s in sorted({c.steps for c in plan.cells if c.rank == k})
      )
      for k in plan.runs
  }


def cell_points(plan: budget_lib.Plan) -> list[dict]:
  """The distinct (K, steps) points of the plan and the studies using each."""
  points = {}
  for c in plan.cells:
    points.setdefault((c.rank, c.steps), set()).add(c.study)
  return [
      dict(K=k, steps=s, studies=sorted(studies))
      for (k, s), studies in sorted(points.items())
  ]


def peak_memory() -> dict:
  """Peak RSS of this process, and device peak bytes where reported."""
  out = dict(rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
  out['rss_bytes'] *= 1024  # Linux reports kilobytes
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  return out


def compile_engine(ctx: sweep.Context) -> dict:
  """The sweep's compiled programs of every planned K, each run once.

  The untimed first run (init, one step, eval) keeps one-off costs of a
  program's first call out of the timed passes, as `warm_up_loop` does for
  the straightforward way.
  """
  programs = {}
  for rank in ctx.plan.runs:
    prog = programs[rank] = sweep.compile_rank(ctx, rank)
    state = prog.init(*sweep.init_args(ctx, 1))
    state, _ = train_lib.advance(
        prog, state, ctx.base, ctx.train, sweep.data_keys(ctx), 1
    )
    jax.block_until_ready(
        prog.evaluate(state.params, ctx.base, ctx.eval_sets['report'])
    )
  return programs


def engine_pass(ctx: sweep.Context, programs: dict, runs: dict) -> dict:
  """Trains `runs` ({K: runs}) as the sweep does, without checkpoints.

  Returns per-K seconds of training (init included) and evaluation, and the
  eval losses of every lane at every eval step, keyed 'K:steps'.
  """
  keys = sweep.data_keys(ctx)
  per_rank, losses = {}, {}
  for rank, rank_runs in runs.items():
    prog = programs[rank]
    train_s = eval_s = 0.0
    for run in rank_runs:
      start = time.perf_counter()
      state = prog.init(*sweep.init_args(ctx, run.total_steps))
      step = 0
      for stop in run.eval_steps:
        state, _ = train_lib.advance(
            prog, state, ctx.base, ctx.train, keys, stop - step
        )
        step = stop
        mid = time.perf_counter()
        train_s += mid - start
        losses[f'{rank}:{stop}'] = {
            name: np.asarray(prog.evaluate(state.params, ctx.base, data))
            for name, data in ctx.eval_sets.items()
        }
        start = time.perf_counter()
        eval_s += start - mid
    per_rank[rank] = dict(
        train_s=train_s,
        eval_s=eval_s,
        steps=sum(r.total_steps for r in rank_runs),
    )
    logging.info(
        'engine K=%d: %d steps x %d lanes in %.1fs (+%.1fs eval)',
        rank,
        per_rank[rank]['steps'],
        len(ctx.lanes),
        train_s,
        eval_s,
    )
  return dict(per_rank=per_rank, losses=losses)


@dataclasses.dataclass(frozen=True)
class LoopPrograms:
  """The straightforward way's compiled functions of one K."""

  init: Any  # init_key -> (params, opt_state) of one seed
  step: Any  # (params, opt_state, frozen, train, data_key, step, total, lr)
  evaluate: Any  # (params, frozen, data) -> eval loss of one seed
  compile_seconds: float
  xla_flops_per_step: float | None


def compile_loop(
    ctx: sweep.Context, rank: int, factor_grad: str = ''
) -> LoopPrograms:
  """A per-step jit train step, init and eval of one seed, compiled for K.

  `factor_grad`, when set, replaces the config's model.factor_grad.
  """
  cfg = ctx.config
  if factor_grad:
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.model.factor_grad = factor_grad
  task = train_lib.lowrank_task(cfg, rank)
  optimizer = optim.make_optimizer(cfg.optim)
  schedule = train_lib.schedule_fn(cfg.optim)

  def init(init_key):
    params = task.init_params(init_key)
    return params, optimizer.init(params)

  def step(params, opt_state, frozen, train, data_key, step, total, lr):
    batch = train_lib.sample_batch(train, data_key, step, cfg.data.batch_size)
    loss, grads = jax.value_and_grad(task.loss)(params, frozen, batch)
    opt_state = optim.with_learning_rate(opt_state, lr * schedule(step, total))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  init_keys, data_keys = train_lib.lane_keys([0])
  start = time.perf_counter()
  init_c = jax.jit(init).lower(init_keys[0]).compile()
  params, opt_state = jax.eval_shape(init, init_keys[0])
  step_c = (
      jax.jit(step)
      .lower(params, opt_state, ctx.base, ctx.train, data_keys[0], 0, 1, 1.0)
      .compile()
  )
  eval_c = (
      jax.jit(task.loss)
      .lower(params, ctx.base, ctx.eval_sets['report'])
      .compile()
  )
  seconds = time.perf_counter() - start
  logging.info(
      'loop K=%d: compiled init, step and eval in %.1fs', rank, seconds
  )
  return LoopPrograms(
      init_c, step_c, eval_c, seconds, train_lib.xla_flops(step_c)
  )


def warm_up_loop(ctx: sweep.Context, progs: LoopPrograms, lane) -> None:
  """One untimed init, step and eval, as a first call of each function."""
  init_key, data_key, lr = lane
  params, opt_state = progs.init(init_key)
  params, _, _ = progs.step(
      params, opt_state, ctx.base, ctx.train, data_key, 0, 1, lr
  )
  jax.block_until_ready(
      progs.evaluate(params, ctx.base, ctx.eval_sets['report'])
  )


def loop_pass(ctx: sweep.Context, runs: dict, factor_grad: str = '') -> dict:
  """Trains every cell of `runs` seed after seed with a per-step jit loop.

  Returns per-K compile, train and eval seconds, XLA FLOPs of a step, and
  every lane's eval loss on the report set, keyed 'K:steps'.
  """
  init_keys, data_keys = train_lib.lane_keys([s for s, _ in ctx.lanes])
  shared = ctx.config.data.shared_across_seeds
  lanes = [
      (init_keys[i], data_keys[0] if shared else data_keys[i], lr)
      for i, (_, lr) in enumerate(ctx.lanes)
  ]
  report = ctx.eval_sets['report']
  per_rank, losses = {}, {}
  for rank, rank_runs in runs.items():
    progs = compile_loop(ctx, rank, factor_grad)
    warm_up_loop(ctx, progs, lanes[0])
    train_s = eval_s = 0.0
    for run in rank_runs:
      steps, cell = run.total_steps, []
      for init_key, data_key, lr in lanes:
        start = time.perf_counter()
        params, opt_state = progs.init(init_key)
        for t in range(steps):
          params, opt_state, _ = progs.step(
              params, opt_state, ctx.base, ctx.train, data_key, t, steps, lr
          )
        jax.block_until_ready(params)
        mid = time.perf_counter()
        cell.append(float(progs.evaluate(params, ctx.base, report)))
        train_s += mid - start
        eval_s += time.perf_counter() - mid
      losses[f'{rank}:{steps}'] = np.asarray(cell)
    per_rank[rank] = dict(
        compile_s=progs.compile_seconds,
        train_s=train_s,
        eval_s=eval_s,
        steps=sum(r.total_steps for r in rank_runs),
        xla_flops_per_step=progs.xla_flops_per_step,
    )
    logging.info(
        'loop K=%d: %d steps x %d seeds in %.1fs (+%.1fs eval)',
        rank,
        per_rank[rank]['steps'],
        len(lanes),
        train_s,
        eval_s,
    )
  return dict(per_rank=per_rank, losses=losses)


def matmul_throughput(
    dtype, sizes, *, min_seconds: float, max_call_seconds: float
) -> dict:
  """GFLOP/s of n x n x n matmuls in `dtype`, per size, and their peak.

  With several devices every size is timed twice: on one device alone and
  as one matmul per device at once (a batch split over all of them); the
  peak is the best of all rows, so utilisation is never flattered by
  measuring only one way. Each shape is compiled and run once untimed, then
  called back to back in three windows of `min_seconds / 3`; a row's rate is
  its fastest window (other jobs on the machine can only slow a window), and
  the mean over all its calls is kept beside it. A size whose predicted
  time per call (cubic in n from the previous size) exceeds
  `max_call_seconds` is skipped, and so are the larger ones.
  """
  devices = jax.devices()
  rows = []
  for count in sorted({1, len(devices)}):
    rows += _matmul_rows(
        dtype, sizes, devices[:count], min_seconds, max_call_seconds
    )
  rates = [r['gflop_per_s'] for r in rows if 'gflop_per_s' in r]
  return dict(sizes=rows, peak_gflop_per_s=max(rates) if rates else None)


def _matmul_rows(dtype, sizes, devices, min_seconds, max_call_seconds):
  """One row per size: one n x n x n matmul on each of `devices` at once."""
  count = len(devices)
  mesh = jax.sharding.Mesh(np.array(devices), ('d',))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d'))
  matmul = jax.jit(jnp.matmul, out_shardings=split)
  rows, previous = [], None
  for n in sorted(sizes):
    if previous and previous[1] * (n / previous[0]) ** 3 > max_call_seconds:
      rows.append(dict(n=n, devices=count, skipped='predicted too slow'))
      break
    a_key, b_key = jax.random.split(jax.random.key(n))
    a = jax.random.normal(a_key, (count, n, n), dtype)
    b = jax.random.normal(b_key, (count, n, n), dtype) / np.sqrt(n)
    a, b = jax.device_put((a, b), split)
    matmul(a, b).block_until_ready()
    windows = [
        _time_calls(matmul, a, b, min_seconds=min_seconds / 3) for _ in range(3)
    ]
    per_call = min(seconds / calls for calls, seconds in windows)
    calls = sum(c for c, _ in windows)
    mean = sum(t for _, t in windows) / calls
    previous = (n, per_call)
    rate = lambda t: 2 * n**3 * count / t / 1e9
    rows.append(
        dict(
            n=n,
            devices=count,
            calls=calls,
            gflop_per_s=rate(per_call),
            gflop_per_s_mean=rate(mean),
        )
    )
  return rows


def _time_calls(fn, *args, min_seconds: float) -> tuple[int, float]:
  """Calls fn(*args) back to back (at least twice) for min_seconds."""
  calls, start = 0, time.perf_counter()
  while calls < 2 or time.perf_counter() - start < min_seconds:
    fn(*args).block_until_ready()  # no queue of calls builds up
    calls += 1
  return calls, time.perf_counter() - start


def machine_limit(settings, when: str, earlier: dict | None = None) -> dict:
  """f32 and bf16 matmul peaks; on CPU bf16 is marked as reference only.

  Rows are tagged `when` ('before' or 'after' the training passes). With
  `earlier` (the result of a first call) the rows of both calls are kept and
  each peak is the best of the two, so a busy moment on a shared machine
  does not lower the peak that utilisation is measured against.
  """
  out = {}
  for name, dtype in (('f32', jnp.float32), ('bf16', jnp.bfloat16)):
    out[name] = matmul_throughput(
        dtype,
        settings.matmul_sizes,
        min_seconds=settings.matmul_min_s,
        max_call_seconds=settings.matmul_max_call_s,
    )
    for row in out[name]['sizes']:
      row['when'] = when
    logging.info(
        'matmul %s peak %s: %s GFLOP/s',
        name,
        when,
        out[name]['peak_gflop_per_s'],
    )
    if earlier is not None:
      before = earlier[name]
      out[name]['sizes'] = before['sizes'] + out[name]['sizes']
      peaks = [before['peak_gflop_per_s'], out[name]['peak_gflop_per_s']]
      peaks = [p for p in peaks if p is not None]
      out[name]['peak_gflop_per_s'] = max(peaks) if peaks else None
  if jax.default_backend() == 'cpu':
    out['bf16']['note'] = (
        'CPU backend: bfloat16 is reported for reference only; the model'
        ' computes in float32 (model.dtype), so utilisation is against the'
        ' float32 peak'
    )
  return out


def on_one_device(ctx: sweep.Context) -> sweep.Context:
  """`ctx` with its data and base on the first device alone, lanes kept.

  The straightforward loop runs here. Left on a split CPU host's mesh, its
  inputs would be replicated and every step computed once per device; on
  one device of the split host a step takes the same time as in an unsplit
  process, whose default single device is what a user's loop would get.
  """
  device = jax.devices()[0]
  move = lambda tree: jax.device_put(tree, device)
  return dataclasses.replace(
      ctx,
      place=train_lib.placement(len(ctx.lanes), [device]),
      train=move(ctx.train),
      base=move(ctx.base),
      eval_sets={k: move(v) for k, v in ctx.eval_sets.items()},
  )


def _with_lanes(
    ctx: sweep.Context, n: int, count: int | None = None
) -> sweep.Context:
  """`ctx` with n lanes over `count` devices (default: as many as divide n)."""
  seed, lr = ctx.lanes[0]
  lanes = tuple((seed + i, lr) for i in range(n))
  devices = jax.devices()
  count = count or environment.cpu_device_count(0, n, len(devices))
  if count == 1:
    return on_one_device(dataclasses.replace(ctx, lanes=lanes))
  place = train_lib.placement(n, devices[:count])
  move = lambda tree: place.put(tree, lanes=False)
  return dataclasses.replace(
      ctx,
      lanes=lanes,
      place=place,
      train=move(ctx.train),
      base=move(ctx.base),
      eval_sets={k: move(v) for k, v in ctx.eval_sets.items()},
  )


def scaling(ctx: sweep.Context, programs: dict, settings) -> dict:
  """Engine seconds per step against lane count (one K) and against K.

  With several devices the study's own lanes are also timed on one device,
  which shows what splitting the lanes over devices is worth.
  """
  steps = settings.scaling_steps
  by_rank = sweep.calibrate(ctx, programs, steps)  # s per lane-step
  rank = settings.scaling_rank or max(
      ctx.plan.runs, key=lambda k: sum(r.total_steps for r in ctx.plan.runs[k])
  )
  points = [(n, None) for n in settings.scaling_seeds]
  if ctx.place.device_count > 1:
    points.append((len(ctx.lanes), 1))
  seeds_rows = []
  for n, count in points:
    sub = _with_lanes(ctx, n, count)
    same = (
        n == len(ctx.lanes) and sub.place.device_count == ctx.place.device_count
    )
    if same and rank in programs:
      prog = programs[rank]
    else:
      prog = sweep.compile_rank(sub, rank)
    per_lane = sweep.calibrate(sub, {rank: prog}, steps)[rank]
    seeds_rows.append(_scaling_row(sub, rank, per_lane, prog))
  rank_rows = [_scaling_row(ctx, k, s, programs[k]) for k, s in by_rank.items()]
  return dict(rank=rank, steps=steps, seeds=seeds_rows, ranks=rank_rows)


def _xla_per_lane(ctx: sweep.Context, prog) -> float | None:
  return train_lib.xla_flops_per_lane_step(
      prog.train_chunk, len(ctx.lanes), ctx.place
  )


def _work_per_seed_step(
    ctx: sweep.Context, rank: int, xla: float | None
) -> float:
  """FLOPs of one seed's train step: XLA's count `xla`, else analytic.

  Every way's FLOP/s and the utilisation use this one count per K, so the
  ways are compared on the same work.
  """
  return ctx.flops_per_step[rank] if xla is None else xla


def _scaling_row(ctx, rank: int, per_lane_step: float, prog):
  lanes = len(ctx.lanes)
  devices = ctx.place.device_count
  return dict(
      K=rank,
      seeds=lanes,
      devices=devices,
      s_per_step=per_lane_step * lanes,
      s_per_seed_step=per_lane_step,
      seed_steps_per_s=1.0 / per_lane_step,
      model_gflop_per_s=(
          _work_per_seed_step(ctx, rank, _xla_per_lane(ctx, prog))
          / per_lane_step
          / 1e9
      ),
      compile_s=prog.compile_seconds,
  )


def _way(
    ctx: sweep.Context, per_rank: dict, compile_s: dict, flops_per_step: dict
) -> dict:
  """Totals of one way: seconds, seed-steps, tokens and model FLOPs."""
  lanes = len(ctx.lanes)
  train_s = sum(r['train_s'] for r in per_rank.values())
  eval_s = sum(r['eval_s'] for r in per_rank.values())
  compile_total = sum(compile_s.values())
  seed_steps = lanes * sum(r['steps'] for r in per_rank.values())
  flops = lanes * sum(
      flops_per_step[k] * r['steps'] for k, r in per_rank.items()
  )
  tokens = seed_steps * ctx.config.data.batch_size * ctx.config.data.seq_len
  return dict(
      compile_s=compile_total,
      train_s=train_s,
      eval_s=eval_s,
      run_s=train_s + eval_s,
      total_s=compile_total + train_s + eval_s,
      seed_steps=seed_steps,
      seed_steps_per_s=seed_steps / train_s,
      tokens=tokens,
      tokens_per_s=tokens / train_s,
      model_flops=flops,
      model_gflop_per_s=flops / train_s / 1e9,
      per_K={
          str(k): dict(r, compile_s=compile_s[k]) for k, r in per_rank.items()
      },
  )


def agreement(engine: dict, unshared: dict, loop: dict | None, rtol: float):
  """Per-cell, per-lane report losses of the three passes and their gaps.

  `within_rtol` holds when both engine passes match the loop to `rtol` on
  every lane of every cell (a non-finite loss never matches).
  """
  rows, abs_diff, rel_diff, prefix_diff = [], [], [], []
  for key in sorted(unshared, key=lambda k: tuple(map(int, k.split(':')))):
    rank, steps = map(int, key.split(':'))
    shared = engine[key]['report'].astype(np.float64)
    alone = unshared[key]['report'].astype(np.float64)
    row = dict(K=rank, steps=steps, engine=_floats(shared))
    row['engine_unshared'] = _floats(alone)
    prefix_diff.append(np.abs(shared - alone))
    if loop is not None:
      plain = loop[key].astype(np.float64)
      row['straightforward'] = _floats(plain)
      for got in (shared, alone):
        abs_diff.append(np.abs(got - plain))
        rel_diff.append(abs_diff[-1] / np.abs(plain))
    rows.append(row)
  out = dict(
      rtol=rtol, cells=rows, prefix_sharing_max_abs_diff=_max(prefix_diff)
  )
  if loop is not None:
    out['max_abs_diff'] = _max(abs_diff)
    out['max_rel_diff'] = _max(rel_diff)
    out['within_rtol'] = (
        out['max_rel_diff'] is not None and out['max_rel_diff'] <= rtol
    )
  return out


def _floats(values) -> list:
  return [float(v) if np.isfinite(v) else None for v in np.asarray(values)]


def _max(arrays) -> float | None:
  values = np.concatenate([np.ravel(a) for a in arrays]) if arrays else []
  if len(values) == 0 or not np.all(np.isfinite(values)):
    return None
  return float(np.max(values))


def _ratio(num: float | None, den: float | None) -> float | None:
  return num / den if num is not None and den else None


def summarize(ctx: sweep.Context, measured: dict, settings) -> dict:
  """The headline numbers: the three ways, ratios, FLOPs, compile, losses."""
  programs, machine = measured['programs'], measured['machine']
  compile_s = {k: p.compile_seconds for k, p in programs.items()}
  xla = {k: _xla_per_lane(ctx, p) for k, p in programs.items()}
  work = {k: _work_per_seed_step(ctx, k, x) for k, x in xla.items()}
  engine = _way(ctx, measured['engine']['per_rank'], compile_s, work)
  unshared = _way(ctx, measured['unshared']['per_rank'], compile_s, work)
  loop = None
  if measured['loop'] is not None:
    per_rank = measured['loop']['per_rank']
    loop_compile = {k: r['compile_s'] for k, r in per_rank.items()}
    loop = _way(ctx, per_rank, loop_compile, work)
  peak = machine['f32']['peak_gflop_per_s']
  flops = {}
  for k in programs:
    flops[str(k)] = dict(
        analytic=ctx.flops_per_step[k],
        xla_engine=xla[k],
        xla_straightforward=(
            loop['per_K'][str(k)]['xla_flops_per_step'] if loop else None
        ),
    )
  return dict(
      engine=engine,
      engine_unshared=unshared,
      straightforward=loop,
      speedup_vs_straightforward=_ratio(
          loop and loop['total_s'], engine['total_s']
      ),
      speedup_same_cells=_ratio(loop and loop['run_s'], unshared['run_s']),
      speedup_same_cells_with_compile=_ratio(
          loop and loop['total_s'], unshared['total_s']
      ),
      speedup_from_prefix_sharing=_ratio(unshared['run_s'], engine['run_s']),
      utilisation=_ratio(engine['model_gflop_per_s'], peak),
      utilisation_straightforward=_ratio(
          loop and loop['model_gflop_per_s'], peak
      ),
      compile_s_per_K={str(k): s for k, s in compile_s.items()},
      flops_per_seed_step=flops,
      agreement=agreement(
          measured['engine']['losses'],
          measured['unshared']['losses'],
          measured['loop'] and measured['loop']['losses'],
          settings.rtol,
      ),
  )


def targets(result: dict) -> list[dict]:
  """Each target with its measured value and whether it is met."""
  compile_max = max(result['compile_s_per_K'].values())

  def row(name, goal, value, met):
    return dict(
        name=name,
        target=goal,
        measured=value,
        met=None if value is None else met,
    )

  speedup, util = result['speedup_vs_straightforward'], result['utilisation']
  return [
      row(
          'speedup vs straightforward (whole study, compile incl.)',
          f'>= {TARGET_SPEEDUP:g}x',
          speedup,
          speedup is not None and speedup >= TARGET_SPEEDUP,
      ),
      row(
          'utilisation of measured f32 matmul peak',
          f'>= {TARGET_UTILISATION:.0%}',
          util,
          util is not None and util >= TARGET_UTILISATION,
      ),
      row(
          'compile seconds per K (max over K)',
          f'< {TARGET_COMPILE_S:g} s',
          compile_max,
          compile_max < TARGET_COMPILE_S,
      ),
      row(
          'peak RSS',
          f'< {TARGET_RSS_BYTES / 1024**3:g} GiB',
          result['peak_rss_bytes'],
          result['peak_rss_bytes'] < TARGET_RSS_BYTES,
      ),
  ]


def _fmt(value, spec: str = '.3g') -> str:
  if value is None:
    return 'n/a'
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  return format(value, spec)


def _table(header: list[str], rows: list[list]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]


def _md_setup(r: dict) -> list[str]:
  m = r['config']['model']
  d = r['config']['data']
  lines = [
      '## What was run',
      '',
      f"Seeds {r['seeds']} ({len(r['lanes'])} lanes); model d_model"
      f" {m['d_model']}, {m['n_layers']} layers, d_mlp {m['d_mlp']}, vocab"
      f" {m['vocab_size']}; batch {d['batch_size']} x {d['seq_len']} tokens"
      f" per seed-step; base {r['config']['base']['kind']}; schedule"
      f" {r['config']['optim']['schedule']} (prefix sharing"
      f" {'on' if r['prefix_shared'] else 'off'}).",
      '',
      'Cells (each trained for every seed):',
      '',
  ]
  lines += _table(
      ['K', 'steps', 'studies'],
      [[c['K'], c['steps'], ', '.join(c['studies'])] for c in r['cells']],
  )
  lines += ['', 'Runs of the engine with prefix sharing (one per K):', '']
  lines += _table(
      ['K', 'run steps', 'evaluated at'],
      [
          [k, run['total_steps'], run['eval_steps']]
          for k, runs in r['runs'].items()
          for run in runs
      ],
  )
  lines += [
      '',
      f"Steps per lane: {r['train_steps']['shared']} with prefix sharing,"
      f" {r['train_steps']['unshared']} with one run per cell (the engine"
      ' without sharing and the straightforward way). The three take turns'
      ' K by K; the engine compiles every K first, as the sweep does, and'
      ' the loop compiles each K at its turn. No checkpoints are written.',
      '',
      _loop_model_text(r),
  ]
  if r.get('left_out'):
    lines += ['', f"Left out: {r['left_out']}."]
  return lines


def _loop_model_text(r: dict) -> str:
  engine = r['config']['model'].get('factor_grad', 'custom')
  loop = r['settings'].get('loop_factor_grad') or engine
  if loop == engine:
    return (
        'The loop runs the same model code as the engine'
        f' (model.factor_grad={engine}); it differs only in how the steps'
        ' are run.'
    )
  return (
      f'The loop differentiates the factors with model.factor_grad={loop}'
      f' (the engine: {engine}), as a first implementation of the layer'
      ' would; the losses are compared at the same tolerance.'
  )


def _md_ways(r: dict) -> list[str]:
  rows = []
  for name, key in (
      ('engine, prefix sharing', 'engine'),
      ('engine, one run per cell', 'engine_unshared'),
      ('straightforward loop', 'straightforward'),
  ):
    w = r[key]
    if w is None:
      continue
    util = _ratio(w['model_gflop_per_s'], r['peak_f32_gflop_per_s'])
    rows.append(
        [
            name,
            _fmt(w['compile_s'], '.1f'),
            _fmt(w['train_s'], '.1f'),
            _fmt(w['eval_s'], '.1f'),
            _fmt(w['run_s'], '.1f'),
            _fmt(w['total_s'], '.1f'),
            w['seed_steps'],
            _fmt(w['seed_steps_per_s'], '.1f'),
            _fmt(w['tokens_per_s'], ',.0f'),
            _fmt(w['model_gflop_per_s'], '.2f'),
            _fmt(util, '.1%'),
        ]
    )
  header = [
      'way',
      'compile s',
      'train s',
      'eval s',
      'train+eval s',
      'total s',
      'seed-steps',
      'seed-steps/s',
      'tokens/s',
      'model GFLOP/s',
      'of f32 peak',
  ]
  ratios = [
      ['speedup_vs_straightforward', r['speedup_vs_straightforward'],
       'loop total / engine (sharing) total, compile included'],
      ['speedup_same_cells', r['speedup_same_cells'],
       'loop / engine one run per cell, train+eval (compile excluded)'],
      ['speedup_same_cells_with_compile', r['speedup_same_cells_with_compile'],
       'as above, compile included'],
      ['speedup_from_prefix_sharing', r['speedup_from_prefix_sharing'],
       'engine one run per cell / engine with sharing, train+eval'],
  ]  # fmt: skip
  return (
      ['## Wall-clock', '']
      + _table(header, rows)
      + [
          '',
          "Train seconds include the lanes' init; FLOP/s and tokens/s are"
          " over train seconds only. Model FLOPs are XLA's cost analysis of"
          " the engine's compiled step per seed (Per K below), the same"
          ' count for every way.',
          '',
      ]
      + _table(
          ['ratio', 'value', 'what'],
          [[n, _fmt(v, '.2f'), w] for n, v, w in ratios],
      )
  )  # fmt: skip


def _md_per_rank(r: dict) -> list[str]:
  rows = []
  loop = r['straightforward']
  for k, f in r['flops_per_seed_step'].items():
    eng = r['engine']['per_K'][k]
    plain = loop['per_K'][k] if loop else {}
    rows.append([
        k,
        _fmt(eng['compile_s'], '.1f'),
        _fmt(plain.get('compile_s'), '.1f'),
        eng['steps'],
        _fmt(eng['train_s'], '.1f'),
        _fmt(r['engine_unshared']['per_K'][k]['train_s'], '.1f'),
        _fmt(plain.get('train_s'), '.1f'),
        _fmt(f['analytic'] / 1e9, '.4f'),
        _fmt(f['xla_engine'] and f['xla_engine'] / 1e9, '.4f'),
        _fmt(f['xla_straightforward'] and f['xla_straightforward'] / 1e9,
             '.4f'),
    ])  # fmt: skip
  header = [
      'K',
      'engine compile s',
      'loop compile s',
      'engine steps',
      'engine train s',
      'engine/cell train s',
      'loop train s',
      'analytic GFLOP',
      'XLA GFLOP (engine)',
      'XLA GFLOP (loop)',
  ]
  return (
      ['## Per K', '']
      + _table(header, rows)
      + [
          '',
          'GFLOP are per seed-step. Analytic counts matmuls only'
          " (flops.py). XLA counts the engine's scanned chunk body once,"
          " per lane (with the lanes split over devices, one device's"
          ' partition over its lanes); both XLA counts include the'
          ' optimizer and elementwise work.',
      ]
  )


def _md_agreement(r: dict) -> list[str]:
  a = r['agreement']
  lines = ['## Same losses', '']
  if 'max_abs_diff' in a:
    lines.append(
        'Final eval loss of every seed in every cell, engine (both passes)'
        ' against the straightforward loop: max abs diff'
        f" {_fmt(a['max_abs_diff'])}, max rel diff"
        f" {_fmt(a['max_rel_diff'])}, tolerance rtol {a['rtol']:g}:"
        f" **{'agree' if a['within_rtol'] else 'DISAGREE'}**."
    )
  lines += [
      'Engine with prefix sharing against one run per cell: max abs diff'
      f" {_fmt(a['prefix_sharing_max_abs_diff'])}.",
      '',
  ]
  header = ['K', 'steps', 'engine', 'engine/cell', 'loop']
  rows = [
      [
          c['K'],
          c['steps'],
          ' '.join(_fmt(v, '.5f') for v in c['engine']),
          ' '.join(_fmt(v, '.5f') for v in c['engine_unshared']),
          ' '.join(_fmt(v, '.5f') for v in c.get('straightforward', [])),
      ]
      for c in a['cells']
  ]
  return lines + _table(header, rows)


def _md_machine(r: dict) -> list[str]:
  rows = []
  for dtype in ('f32', 'bf16'):
    for s in r['machine'][dtype]['sizes']:
      rate = _fmt(s.get('gflop_per_s'), '.1f') if 'calls' in s else s['skipped']
      mean = _fmt(s.get('gflop_per_s_mean'), '.1f') if 'calls' in s else ''
      rows.append([dtype, s.get('when', ''), s['n'], s['devices'], rate, mean])
  lines = [
      '## Machine limit (n x n x n matmul)',
      '',
      'One matmul per device, on one device alone and on all devices at'
      ' once, measured before and after the training passes. GFLOP/s is the'
      ' fastest of three timing windows, mean over all calls beside it; the'
      ' peak is the best row.',
      '',
  ] + _table(['dtype', 'when', 'n', 'devices', 'GFLOP/s', 'mean'], rows)
  lines.append('')
  lines.append(
      f"Peak f32: {_fmt(r['peak_f32_gflop_per_s'], '.1f')} GFLOP/s; peak bf16:"
      f" {_fmt(r['machine']['bf16']['peak_gflop_per_s'], '.1f')} GFLOP/s."
  )
  if 'note' in r['machine']['bf16']:
    lines.append(r['machine']['bf16']['note'] + '.')
  return lines


def _md_scaling(r: dict) -> list[str]:
  s = r['scaling']
  header = [
      'K',
      'seeds',
      'devices',
      's/step',
      's/seed-step',
      'seed-steps/s',
      'model GFLOP/s',
      'compile s',
  ]

  def rows(entries):
    return [
        [
            e['K'],
            e['seeds'],
            e['devices'],
            _fmt(e['s_per_step'], '.4f'),
            _fmt(e['s_per_seed_step'], '.4f'),
            _fmt(e['seed_steps_per_s'], '.1f'),
            _fmt(e['model_gflop_per_s'], '.2f'),
            _fmt(e['compile_s'], '.1f'),
        ]
        for e in entries
    ]

  return (
      [
          '## Engine scaling',
          '',
          f"Each point times {s['steps']} steps after one warm-up step"
          ' (sweep.calibrate); the lanes are split over as many devices as'
          ' divide them evenly. Against the number of seeds at'
          f" K={s['rank']}:",
          '',
      ]
      + _table(header, rows(s['seeds']))
      + ['', f"Against K at {len(r['lanes'])} seeds:", '']
      + _table(header, rows(s['ranks']))
  )


def _md_targets(r: dict) -> list[str]:
  rows = []
  for t in r['targets']:
    value = t['measured']
    if 'RSS' in t['name']:
      shown = _fmt(value / 1024**3, '.2f') + ' GiB'
    elif 'utilisation' in t['name']:
      shown = _fmt(value, '.1%')
    else:
      shown = _fmt(value, '.2f')
    met = {True: 'pass', False: 'miss', None: 'not measured'}[t['met']]
    rows.append([t['name'], t['target'], shown, met])
  return ['## Targets', ''] + _table(['target', 'goal', 'measured', ''], rows)


def markdown(r: dict) -> str:
  env = r['environment']
  mem = r['memory']['end']
  head = [
      '# Benchmark: the sweep engine against a per-step jit loop',
      '',
      f"{env['backend']} backend, {env['device_count']} device(s)"
      f" ({env['device_kind']}), JAX {env['packages']['jax']}. Persistent"
      f" compilation cache off ({r['persistent_cache_hits']} hits). Whole"
      f" benchmark {r['wall_s']:.0f} s, of which setup (data, base)"
      f" {r['setup_s']:.0f} s. Peak RSS {mem['rss_bytes'] / 1024**3:.2f} GiB"
      + (
          f", device peak {mem['device_peak_bytes'] / 1024**3:.2f} GiB."
          if 'device_peak_bytes' in mem
          else '.'
      ),
      '',
      'NOTE: wall-clock numbers are from one run; on a shared or busy'
      ' machine they are noisy, and the ratios less so than the seconds.'
      f" Here: {r['cpu_count']} CPUs, 1-minute load average"
      f" {r['load_avg']['start']:.1f} at the start and"
      f" {r['load_avg']['end']:.1f} at the end; this process used"
      f" {r['cpu_s']:.0f} CPU seconds in {r['wall_s']:.0f} s.",
      '',
  ]
  sections = (
      _md_targets,
      _md_ways,
      _md_setup,
      _md_per_rank,
      _md_agreement,
      _md_machine,
      _md_scaling,
  )
  lines = head
  for section in sections:
    lines += section(r) + ['']
  return '\n'.join(lines)


def check_settings(settings) -> None:
  """Raises UserError on a benchmark setting that cannot work."""
  checks = (
      ('rtol', settings.rtol > 0, 'must be > 0'),
      ('scaling_rank', settings.scaling_rank >= 0, 'must be >= 0'),
      ('scaling_steps', settings.scaling_steps > 0, 'must be > 0'),
      (
          'scaling_seeds',
          bool(settings.scaling_seeds)
          and all(n > 0 for n in settings.scaling_seeds),
          'must be positive lane counts',
      ),
      (
          'matmul_sizes',
          bool(settings.matmul_sizes)
          and all(n > 0 for n in settings.matmul_sizes),
          'must be positive sizes',
      ),
      ('matmul_min_s', settings.matmul_min_s > 0, 'must be > 0'),
      (
          'loop_factor_grad',
          settings.loop_factor_grad in ('',) + validate.FACTOR_GRAD,
          "must be '' (the engine's) or one of "
          + ', '.join(validate.FACTOR_GRAD),
      ),
  )
  for name, ok, what in checks:
    if not ok:
      raise errors.UserError(f'benchmark.{name}={settings[name]!r} {what}')


def _merge(parts: list[dict]) -> dict:
  out = dict(per_rank={}, losses={})
  for part in parts:
    out['per_rank'].update(part['per_rank'])
    out['losses'].update(part['losses'])
  return out


def measure(ctx: sweep.Context, settings) -> dict:
  """Runs the three ways and the scaling tables; returns raw measurements.

  The ways take turns K by K (engine with sharing, engine one run per cell,
  loop), so a change in the machine's load during the benchmark falls on
  all three alike rather than on whichever runs last.
  """
  memory = dict(setup=peak_memory())
  machine = machine_limit(settings, 'before')
  programs = compile_engine(ctx)
  prog = next(iter(programs.values()))
  untuned = prog.init(*sweep.init_args(ctx, 1))  # B = 0: the base model
  base_loss = prog.evaluate(untuned.params, ctx.base, ctx.eval_sets['report'])
  per_cell = unshared_runs(ctx.plan)
  loop_ctx = on_one_device(ctx)
  engine, unshared, loop = [], [], []
  for rank, runs in ctx.plan.runs.items():
    engine.append(engine_pass(ctx, programs, {rank: runs}))
    unshared.append(engine_pass(ctx, programs, {rank: per_cell[rank]}))
    if settings.straightforward:
      loop.append(
          loop_pass(loop_ctx, {rank: per_cell[rank]}, settings.loop_factor_grad)
      )
  memory['training'] = peak_memory()
  scale = scaling(ctx, programs, settings)
  memory['scaling'] = peak_memory()
  machine = machine_limit(settings, 'after', machine)
  memory['end'] = peak_memory()
  return dict(
      programs=programs,
      base_eval_loss=float(np.asarray(base_loss)[0]),
      engine=_merge(engine),
      unshared=_merge(unshared),
      loop=_merge(loop) if settings.straightforward else None,
      scaling=scale,
      machine=machine,
      memory=memory,
  )


def _context(ctx: sweep.Context) -> dict:
  """What was run: config, environment, lanes, cells and runs."""
  config = ctx.config
  left_out = None
  if config.studies.wallclock_matched.enabled:
    left_out = (
        'the wallclock_matched cells: their step counts come from a timing'
        ' calibration, so they would differ from run to run'
    )
  return dict(
      config=config.to_dict(),
      environment=environment.describe(),
      devices=[str(d) for d in jax.devices()],
      seeds=list(ctx.seeds),
      lanes=[dict(seed=s, lr=lr) for s, lr in ctx.lanes],
      prefix_shared=ctx.plan.prefix_shared,
      cells=cell_points(ctx.plan),
      runs={
          str(k): [dataclasses.asdict(r) for r in runs]
          for k, runs in ctx.plan.runs.items()
      },
      train_steps=dict(
          shared=ctx.plan.train_steps, unshared=ctx.plan.unshared_steps
      ),
      left_out=left_out,
  )


def run_benchmark(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the benchmark; writes benchmark.json and benchmark.md to workdir."""
  start, cpu_start = time.perf_counter(), time.process_time()
  load_start = os.getloadavg()
  settings = settings_of(config)
  check_settings(settings)
  validate.check_cpu_devices(config)
  environment.split_cpu_host(config)
  checkpoint.ensure_writable(workdir)
  environment.log_start(config)
  hits = _CacheHits()
  jax.monitoring.register_event_listener(hits)
  try:
    with compilation_cache_off():
      ctx = sweep.prepare(config, workdir)
      setup_s = time.perf_counter() - start
      measured = measure(ctx, settings)
  finally:
    jax.monitoring.unregister_event_listener(hits)
  result = _context(ctx)
  result.update(summarize(ctx, measured, settings))
  result.update(
      settings=settings.to_dict(),
      base_eval_loss=measured['base_eval_loss'],
      machine=measured['machine'],
      peak_f32_gflop_per_s=measured['machine']['f32']['peak_gflop_per_s'],
      scaling=measured['scaling'],
      memory=measured['memory'],
      peak_rss_bytes=measured['memory']['end']['rss_bytes'],
      persistent_cache_hits=hits.count,
      setup_s=setup_s,
      wall_s=time.perf_counter() - start,
      cpu_s=time.process_time() - cpu_start,
      load_avg=dict(start=load_start[0], end=os.getloadavg()[0]),
      cpu_count=os.cpu_count(),
  )
  result['targets'] = targets(result)
  paths = {
      name: os.path.join(workdir, name)
      for name in ('benchmark.json', 'benchmark.md')
  }
  checkpoint.write_json(paths['benchmark.json'], _jsonable(result))
  checkpoint.write_text(paths['benchmark.md'], markdown(result))
  for name, path in paths.items():
    logging.info('Wrote %s: %s', name, path)
  return result


def _jsonable(tree):
  """Plain JSON types: numpy scalars become floats/ints, NaN becomes None."""
  if isinstance(tree, dict):
    return {str(k): _jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_jsonable(v) for v in tree]
  if isinstance(tree, (bool, np.bool_)):
    return bool(tree)
  if isinstance(tree, (int, np.integer)):
    return int(tree)
  if isinstance(tree, (float, np.floating)):
    return float(tree) if np.isfinite(tree) else None
  return tree
