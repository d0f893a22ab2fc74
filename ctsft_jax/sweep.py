"""The sweep: plan the cells, train each K once for all seeds, collect results.

  config -> data, base -> plan -> per K: compile, run(s) in chunks
         -> cell records -> results.json, report.md, figures

Everything a run produces is recorded in `manifest.json` as soon as the run
finishes, and each run checkpoints its state while it trains, so rerunning
the same command on the same workdir skips finished runs and continues an
unfinished one from its latest complete checkpoint.
"""

import dataclasses
import json
import os
import shutil
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctsft_jax import base as base_lib
from ctsft_jax import budget as budget_lib
from ctsft_jax import checkpoint
from ctsft_jax import data as data_lib
from ctsft_jax import environment
from ctsft_jax import errors
from ctsft_jax import lowrank
from ctsft_jax import optim
from ctsft_jax import report
from ctsft_jax import train as train_lib
from ctsft_jax import validate

LOG_EVERY_S = 10.0  # seconds between progress lines


@dataclasses.dataclass
class Context:
  """Everything the runs of a sweep share."""

  config: ml_collections.ConfigDict
  workdir: str
  data_info: dict
  train: train_lib.DataArrays  # on device
  eval_data: train_lib.DataArrays  # on device, padded to eval_batch rows
  base: dict  # frozen base params
  base_info: dict
  plan: budget_lib.Plan
  seeds: tuple[int, ...]  # one per lane


def _to_device(split, pad_to: int = 1) -> train_lib.DataArrays:
  arrays = train_lib.DataArrays(
      *(jnp.asarray(x) for x in (split.inputs, split.targets, split.weights))
  )
  return train_lib.pad_rows(arrays, pad_to)


def make_plan(config: ml_collections.ConfigDict) -> budget_lib.Plan:
  """The plan of the config's studies, with trainable params per K."""
  targets = tuple(config.lowrank.targets)
  trainable = {
      k: lowrank.trainable_params(
          lowrank.factor_shapes(config.model, k, targets)
      )
      for k in budget_lib.ranks_needed(config.studies)
  }
  budget = budget_lib.budget_param_steps(config.budget, trainable)
  return budget_lib.make_plan(
      config.studies,
      budget,
      trainable,
      prefix_shared=not optim.depends_on_total_steps(config.optim),
  )


def log_plan(plan: budget_lib.Plan, max_rank: int) -> None:
  logging.info('Budget: %s param-steps', f'{plan.budget:,}')
  logging.info('Setup: K | trainable params | steps | param-steps')
  for row in budget_lib.setup_rows(plan):
    logging.info(
        '  %3d | %10s | %5d | %s',
        row['K'],
        f"{row['trainable_params']:,}",
        row['steps'],
        f"{row['param_steps']:,}",
    )
  if plan.prefix_shared:
    logging.info(
        'Prefix sharing on (schedule is constant after warmup): %d train steps'
        ' per seed instead of %d (saves %d).',
        plan.train_steps,
        plan.unshared_steps,
        plan.unshared_steps - plan.train_steps,
    )
  else:
    logging.info(
        'Prefix sharing off (schedule depends on run length): each of the'
        ' %d cells is its own run, %d train steps per seed.',
        sum(len(r) for r in plan.runs.values()),
        plan.train_steps,
    )
  logging.info(
      'Largest K %d vs min(d_in, d_out) over targets %d (ratio %.2f)',
      max(plan.runs),
      max_rank,
      max(plan.runs) / max_rank,
  )


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Context:
  """Validates the config, loads data and base, and plans the cells."""
  max_rank = validate.check_config(config)
  plan = make_plan(config)
  log_plan(plan, max_rank)
  cache_dir = base_lib.cache_root(config)
  dataset = data_lib.load_sft(config.data, cache_dir=cache_dir)
  logging.info('Data: %s', dataset.info)
  base, base_info = base_lib.load_base(config)
  seeds = tuple(config.seed + i for i in range(config.seeds))
  return Context(
      config=config,
      workdir=workdir,
      data_info=dict(dataset.info),
      train=_to_device(dataset.train),
      eval_data=_to_device(dataset.eval, config.train.eval_batch),
      base=base,
      base_info=dict(base_info, max_rank=max_rank),
      plan=plan,
      seeds=seeds,
  )


def _finite_or_none(values) -> list:
  return [float(v) if np.isfinite(v) else None for v in np.asarray(values)]


class _Progress:
  """Rate-limited progress lines with throughput and ETA."""

  def __init__(self, label: str, total: int, start_step: int):
    self.label, self.total = label, total
    self.start_step, self.start = start_step, time.perf_counter()
    self.last_log = 0.0

  def update(self, step: int, losses: np.ndarray) -> None:
    now = time.perf_counter()
    if now - self.last_log < LOG_EVERY_S and step < self.total:
      return
    self.last_log = now
    rate = (step - self.start_step) / max(now - self.start, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    logging.info(
        '%s: step %d/%d (%.0f%%), %.1f steps/s, ETA %.0fs, train loss %s',
        self.label,
        step,
        self.total,
        100 * step / self.total,
        rate,
        eta,
        np.array2string(losses, precision=3),
    )


def _restore_or_init(ckpts, programs, ctx, run, init_args):
  state = programs.init(*init_args)
  step = ckpts.latest_step()
  if step is None:
    return state, dict(train_loss=[], eval={}, train_seconds=0.0)
  logging.info('K=%d: resuming from the checkpoint at step %d', run.rank, step)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state
  )
  return ckpts.restore(step, abstract)


def train_run(ctx: Context, programs, run: budget_lib.Run) -> dict:
  """Trains one run of one K for all lanes; returns its record."""
  cfg = ctx.config
  n = len(ctx.seeds)
  init_keys, data_keys = train_lib.lane_keys(ctx.seeds)
  init_args = (
      init_keys,
      jnp.full((n,), cfg.optim.learning_rate, jnp.float32),
      jnp.full((n,), run.total_steps, jnp.int32),
  )
  ckpt_dir = os.path.join(
      ctx.workdir, 'checkpoints', f'K{run.rank}_steps{run.total_steps}'
  )
  ckpts = checkpoint.RunCheckpoints(ckpt_dir)
  state, progress = _restore_or_init(ckpts, programs, ctx, run, init_args)
  if cfg.data.shared_across_seeds:
    data_keys = data_keys[0]
  meter = _Progress(f'K={run.rank}', run.total_steps, int(state.step))
  chunks = 0
  while int(state.step) < run.total_steps:
    start = time.perf_counter()
    state, losses = programs.train_chunk(state, ctx.base, ctx.train, data_keys)
    losses = np.asarray(losses)
    progress['train_seconds'] += time.perf_counter() - start
    progress['train_loss'].extend(_finite_or_none(row) for row in losses)
    step, chunks = int(state.step), chunks + 1
    meter.update(step, losses[-1])
    if step in run.eval_steps:
      eval_loss = programs.evaluate(state.params, ctx.base, ctx.eval_data)
      progress['eval'][str(step)] = _finite_or_none(eval_loss)
    if (
        chunks % cfg.train.checkpoint_every_chunks == 0
        or step == run.total_steps
    ):
      ckpts.save(step, state, progress)
  ckpts.wait()
  ckpts.close()
  progress['status'] = np.asarray(state.status).tolist()
  progress['diverged_step'] = np.asarray(state.diverged_step).tolist()
  return progress


def run_rank(ctx: Context, rank: int, manifest: dict) -> dict:
  """Compiles K's programs once and trains each of its unfinished runs."""
  runs = ctx.plan.runs[rank]
  todo = [r for r in runs if _run_id(r) not in manifest['runs']]
  if not todo:
    logging.info('K=%d: all runs finished earlier; skipping', rank)
    return manifest
  cfg = ctx.config
  programs = train_lib.compile_programs(
      train_lib.lowrank_task(cfg, rank),
      optim_config=cfg.optim,
      batch_size=cfg.data.batch_size,
      eval_batch=cfg.train.eval_batch,
      n_lanes=len(ctx.seeds),
      chunk_steps=budget_lib.chunk_steps(
          ctx.plan, rank, cfg.train.max_chunk_steps
      ),
      frozen=ctx.base,
      train=ctx.train,
      eval_data=ctx.eval_data,
      shared_data=cfg.data.shared_across_seeds,
  )
  manifest['compile_seconds'][str(rank)] = programs.compile_seconds
  manifest['flops_per_step'][str(rank)] = step_flops(programs, len(ctx.seeds))
  if manifest.get('base_eval_loss') is None:
    manifest['base_eval_loss'] = base_eval_loss(ctx, programs)
  for run in todo:
    record = train_run(ctx, programs, run)
    manifest['runs'][_run_id(run)] = record
    checkpoint.write_json(os.path.join(ctx.workdir, 'manifest.json'), manifest)
  return manifest


def step_flops(programs: train_lib.Programs, n_lanes: int) -> float:
  """Model FLOPs of one train step of one lane, from XLA's cost analysis.

  XLA counts the body of the scan once, so the chunk's count is one step of
  every lane.
  """
  return float(programs.train_chunk.cost_analysis()['flops']) / n_lanes


def _run_id(run: budget_lib.Run) -> str:
  return f'K{run.rank}_steps{run.total_steps}'


def _run_of(plan: budget_lib.Plan, cell: budget_lib.Cell) -> budget_lib.Run:
  return next(r for r in plan.runs[cell.rank] if cell.steps in r.eval_steps)


def _window_mean(rows: list, steps: int) -> list:
  """Per-lane mean train loss over the cell's last max(1, steps/10) steps."""
  width = max(1, round(steps / 10))
  window = np.array(
      [
          [np.nan if v is None else v for v in row]
          for row in rows[steps - width : steps]
      ]
  )
  with np.errstate(all='ignore'):
    return _finite_or_none(np.mean(window, axis=0))


def cell_record(ctx: Context, manifest: dict, cell: budget_lib.Cell) -> dict:
  """The results.json entry of one cell: its losses for every seed."""
  run = _run_of(ctx.plan, cell)
  record = manifest['runs'][_run_id(run)]
  diverged = [0 <= d < cell.steps for d in record['diverged_step']]
  mask = lambda values: [None if bad else v for v, bad in zip(values, diverged)]
  n = len(ctx.seeds)
  sec_per_step = record['train_seconds'] / run.total_steps
  out = dict(
      study=cell.study,
      K=cell.rank,
      steps=cell.steps,
      trainable_params=ctx.plan.trainable[cell.rank],
      param_steps=ctx.plan.trainable[cell.rank] * cell.steps,
      flops=cell.steps * manifest['flops_per_step'][str(cell.rank)],
      wall_s=cell.steps * sec_per_step / n,
      final_eval_loss=mask(record['eval'][str(cell.steps)]),
      final_train_loss=mask(_window_mean(record['train_loss'], cell.steps)),
      status=['diverged' if bad else 'ok' for bad in diverged],
      diverged_step=[
          d if bad else None
          for d, bad in zip(record['diverged_step'], diverged)
      ],
  )
  if cell.multiplier is not None:
    out['multiplier'] = cell.multiplier
  if cell.pair is not None:
    out['pair'] = cell.pair
  return out


def _curves(ctx: Context, manifest: dict) -> dict:
  """Per K, the per-step train losses of its longest run (every lane)."""
  curves = {}
  for rank, runs in ctx.plan.runs.items():
    longest = max(runs, key=lambda r: r.total_steps)
    curves[str(rank)] = manifest['runs'][_run_id(longest)]['train_loss']
  return curves


def base_eval_loss(ctx: Context, programs) -> float:
  """Eval loss of the untuned base (zero B factors), for reference."""
  init_keys, _ = train_lib.lane_keys(ctx.seeds)
  n = len(ctx.seeds)
  state = programs.init(
      init_keys, jnp.zeros((n,), jnp.float32), jnp.ones((n,), jnp.int32)
  )
  return float(programs.evaluate(state.params, ctx.base, ctx.eval_data)[0])


def _load_manifest(workdir: str) -> dict:
  path = os.path.join(workdir, 'manifest.json')
  if os.path.exists(path):
    return checkpoint.read_json(path)
  return dict(runs={}, compile_seconds={}, flops_per_step={})


def results_dict(ctx: Context, manifest: dict) -> dict:
  cells = [cell_record(ctx, manifest, c) for c in ctx.plan.cells]
  sec_per_step = {}
  for rank, runs in ctx.plan.runs.items():
    records = [manifest['runs'][_run_id(r)] for r in runs]
    sec_per_step[str(rank)] = sum(r['train_seconds'] for r in records) / sum(
        r.total_steps for r in runs
    )
  return dict(
      config=ctx.config.to_dict(),
      environment=environment.describe(),
      data=ctx.data_info,
      base=ctx.base_info,
      seeds=list(ctx.seeds),
      budget=dict(
          param_steps=ctx.plan.budget,
          anchor_K=ctx.config.budget.anchor_rank,
          anchor_steps=ctx.config.budget.anchor_steps,
      ),
      prefix_shared=ctx.plan.prefix_shared,
      setup=budget_lib.setup_rows(ctx.plan),
      base_eval_loss=manifest.get('base_eval_loss'),
      cells=cells,
      curves=_curves(ctx, manifest),
      timing=dict(
          compile_seconds=manifest['compile_seconds'],
          seconds_per_step=sec_per_step,
          flops_per_step=manifest['flops_per_step'],
      ),
  )


def check_workdir(
    config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool
) -> None:
  """Creates the workdir, or refuses one made with a different config."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write-probe')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise errors.UserError(
        f'--workdir={workdir} cannot be written ({e.strerror}); choose a'
        ' writable directory'
    ) from None
  path = os.path.join(workdir, 'config.json')
  new = config.to_dict()
  if os.path.exists(path) and not overwrite:
    old = checkpoint.read_json(path)
    differ = validate.differing_keys(old, json_roundtrip(new))
    if differ:
      raise errors.UserError(
          f'--workdir={workdir} holds a sweep with a different config (keys'
          f' {", ".join(differ)}); use a new workdir or pass --overwrite'
      )
  if overwrite:
    for name in ('manifest.json', 'results.json'):
      if os.path.exists(os.path.join(workdir, name)):
        os.remove(os.path.join(workdir, name))
    shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
  checkpoint.write_json(path, new)


def json_roundtrip(obj):
  return json.loads(json.dumps(obj))


def run_sweep(
    config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False
) -> dict:
  """Runs (or resumes) the whole sweep; writes every artifact to `workdir`."""
  check_workdir(config, workdir, overwrite=overwrite)
  ctx = prepare(config, workdir)
  manifest = _load_manifest(workdir)
  for rank in ctx.plan.runs:
    manifest = run_rank(ctx, rank, manifest)
  results = results_dict(ctx, manifest)
  paths = report.write_all(results, workdir)
  for name, path in paths.items():
    logging.info('Wrote %s: %s', name, path)
  return results
