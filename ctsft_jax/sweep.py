"""The sweep: plan the cells, train each K once for all lanes, write results.

  config -> data, base -> plan -> compile every K -> calibrate seconds/step
         -> per K: run(s) in chunks, evaluating at every cell's step
         -> cell records -> results.json, report.md, figures

A *lane* is one (seed, learning rate) pair; without a learning-rate grid the
lanes are the seeds. Everything a run produces is recorded in `manifest.json`
as soon as the run finishes, and each run checkpoints its state while it
trains, so rerunning the same command on the same workdir skips finished runs
and continues an unfinished one from its latest complete checkpoint.
"""

import dataclasses
import json
import os
import shutil
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctsft_jax import base as base_lib
from ctsft_jax import budget as budget_lib
from ctsft_jax import checkpoint
from ctsft_jax import data as data_lib
from ctsft_jax import environment
from ctsft_jax import errors
from ctsft_jax import flops as flops_lib
from ctsft_jax import lowrank
from ctsft_jax import metrics as metrics_lib
from ctsft_jax import optim
from ctsft_jax import preemption
from ctsft_jax import report
from ctsft_jax import results as results_lib
from ctsft_jax import train as train_lib
from ctsft_jax import validate


@dataclasses.dataclass
class Context:
  """Everything the runs of a sweep share."""

  config: ml_collections.ConfigDict
  workdir: str
  data_info: dict
  train: train_lib.DataArrays  # on device
  eval_sets: dict  # name -> DataArrays on device: 'report' (+ 'select')
  base: dict  # frozen base params
  base_info: dict
  plan: budget_lib.Plan
  lanes: tuple[tuple[int, float], ...]  # (seed, peak learning rate)
  flops_per_step: dict[int, float]  # K -> analytic FLOPs per lane-step
  place: train_lib.Placement  # lanes split over all devices

  @property
  def seeds(self) -> tuple[int, ...]:
    return tuple(sorted({seed for seed, _ in self.lanes}))

  @property
  def lrs(self) -> tuple[float, ...]:
    return tuple(sorted({lr for _, lr in self.lanes}))


def lanes_of(config: ml_collections.ConfigDict):
  """(seed, lr) per lane: seed-major, so lane = seed_index * n_lr + lr_index."""
  lrs = tuple(config.optim.lr_grid) or (config.optim.learning_rate,)
  seeds = [config.seed + i for i in range(config.seeds)]
  return tuple((s, float(lr)) for s in seeds for lr in lrs)


def _to_device(split, rows=None, pad_to: int = 1) -> train_lib.DataArrays:
  arrays = (split.inputs, split.targets, split.weights)
  if rows is not None:
    arrays = tuple(x[rows] for x in arrays)
  return train_lib.pad_rows(
      train_lib.DataArrays(*(jnp.asarray(x) for x in arrays)), pad_to
  )


def eval_sets(config, split) -> dict:
  """The eval set; with an LR grid, halves for selection and for the report.

  The halves are the even and odd rows, padded to the same number of rows so
  one compiled eval program serves both.
  """
  batch = config.train.eval_batch
  if not config.optim.lr_grid:
    return dict(report=_to_device(split, pad_to=batch))
  n = split.inputs.shape[0]
  half = -(-((n + 1) // 2) // batch) * batch
  return dict(
      select=_to_device(split, np.arange(0, n, 2), pad_to=half),
      report=_to_device(split, np.arange(1, n, 2), pad_to=half),
  )


def make_plan(config, seconds_per_step=None) -> budget_lib.Plan:
  """The plan of the config's studies; axis cells where costs are known."""
  targets = tuple(config.lowrank.targets)
  anchor_rank = config.budget.anchor_rank
  # The anchor K's params define the budget even when no study trains it.
  trainable = {
      k: lowrank.trainable_params(
          lowrank.factor_shapes(config.model, k, targets)
      )
      for k in {*budget_lib.ranks_needed(config.studies), anchor_rank}
  }
  budget = budget_lib.budget_param_steps(config.budget, trainable)
  studies = config.studies
  ranks = tuple(studies.budget_matched.ranks)
  anchor = dict(
      anchor_rank=anchor_rank, anchor_steps=config.budget.anchor_steps
  )
  extra = []
  if studies.flops_matched.enabled and studies.budget_matched.enabled:
    extra += budget_lib.axis_cells(
        ranks,
        flops_lib.flops_per_step(config, {*ranks, anchor_rank}),
        study='flops_matched',
        **anchor,
    )
  if studies.wallclock_matched.enabled and seconds_per_step:
    extra += budget_lib.axis_cells(
        ranks, seconds_per_step, study='wallclock_matched', **anchor
    )
  return budget_lib.make_plan(
      studies,
      budget,
      trainable,
      prefix_shared=not optim.depends_on_total_steps(config.optim),
      extra_cells=tuple(extra),
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
  for rank, runs in plan.runs.items():
    for run in runs:
      logging.info(
          'K=%d: run of %d steps, evaluated at %s',
          rank,
          run.total_steps,
          list(run.eval_steps),
      )
  if plan.prefix_shared:
    logging.info(
        'Prefix sharing on (schedule is constant after warmup): %d train steps'
        ' per lane instead of %d (saves %d).',
        plan.train_steps,
        plan.unshared_steps,
        plan.unshared_steps - plan.train_steps,
    )
  else:
    logging.info(
        'Prefix sharing off (the schedule depends on run length): every step'
        ' count is its own run, %d train steps per lane.',
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
  cache_dir = base_lib.cache_root(config)
  dataset = data_lib.load_sft(config.data, cache_dir=cache_dir)
  logging.info('Data: %s', dataset.info)
  data_lib.check_model_vocab(config.model.vocab_size, dataset.info)
  base, base_info = base_lib.load_base(config)
  lanes = lanes_of(config)
  place = train_lib.placement(len(lanes))
  sets = eval_sets(config, dataset.eval)
  return Context(
      config=config,
      workdir=workdir,
      data_info=dict(dataset.info),
      train=place.put(_to_device(dataset.train), lanes=False),
      eval_sets={k: place.put(v, lanes=False) for k, v in sets.items()},
      base=place.put(base, lanes=False),
      base_info=dict(base_info, max_rank=max_rank),
      plan=plan,
      lanes=lanes,
      flops_per_step=flops_lib.flops_per_step(config, plan.runs),
      place=place,
  )


def init_args(ctx: Context, total_steps: int):
  init_keys, _ = train_lib.lane_keys([seed for seed, _ in ctx.lanes])
  n = len(ctx.lanes)
  args = (
      init_keys,
      jnp.asarray([lr for _, lr in ctx.lanes], jnp.float32),
      jnp.full((n,), total_steps, jnp.int32),
  )
  return ctx.place.put(args, lanes=True)


def data_keys(ctx: Context):
  _, keys = train_lib.lane_keys([seed for seed, _ in ctx.lanes])
  if ctx.config.data.shared_across_seeds:
    return ctx.place.put(keys[0], lanes=False)
  return ctx.place.put(keys, lanes=True)


def compile_rank(ctx: Context, rank: int) -> train_lib.Programs:
  cfg = ctx.config
  return train_lib.compile_programs(
      train_lib.lowrank_task(cfg, rank),
      optim_config=cfg.optim,
      batch_size=cfg.data.batch_size,
      eval_batch=cfg.train.eval_batch,
      n_lanes=len(ctx.lanes),
      chunk_steps=cfg.train.chunk_steps,
      frozen=ctx.base,
      train=ctx.train,
      eval_data=ctx.eval_sets['report'],
      shared_data=cfg.data.shared_across_seeds,
      place=ctx.place,
  )


def calibrate(ctx: Context, programs: dict, steps: int) -> dict[int, float]:
  """Measured seconds of one train step of one lane, per K.

  Times `steps` steps of every lane on a throwaway state, after one untimed
  warm-up chunk, and divides by the number of lanes. In a multi-host job
  every process uses process 0's timings, so all plan the same cells.
  """
  seconds = {}
  for rank, prog in programs.items():
    state = prog.init(*init_args(ctx, steps))
    keys = data_keys(ctx)
    state, _ = train_lib.advance(prog, state, ctx.base, ctx.train, keys, 1)
    start = time.perf_counter()
    train_lib.advance(prog, state, ctx.base, ctx.train, keys, steps)
    seconds[rank] = (time.perf_counter() - start) / steps / len(ctx.lanes)
    logging.info(
        'K=%d: %.2e s per lane-step (calibration)', rank, seconds[rank]
    )
  if jax.process_count() > 1:
    shared = multihost_utils.broadcast_one_to_all(
        np.array(list(seconds.values()))
    )
    seconds = dict(zip(seconds, np.asarray(shared).tolist()))
  return seconds


def _restore_or_init(ckpts, programs, run, args):
  """The latest readable checkpoint of the run, else a fresh state.

  A checkpoint that fails to restore (corrupt or truncated files) is
  reported by its path and the previous one is tried.
  """
  state = programs.init(*args)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state,
  )
  for step in sorted(ckpts.all_steps(), reverse=True):
    try:
      restored = ckpts.restore(step, abstract)
    except errors.UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      logging.error(
          'Checkpoint %s/%d is unreadable (%s: %s); trying an older one',
          ckpts.directory,
          step,
          type(e).__name__,
          str(e)[:200],
      )
      continue
    logging.info(
        'K=%d: resuming from the checkpoint at step %d', run.rank, step
    )
    return restored
  return state, dict(train_loss=[], eval={}, train_seconds=0.0)


def _evaluate(ctx: Context, programs, state) -> dict:
  return {
      name: results_lib.finite_or_none(
          programs.evaluate(state.params, ctx.base, data)
      )
      for name, data in ctx.eval_sets.items()
  }


def _boundaries(run: budget_lib.Run, start: int, chunk: int, every: int):
  """Steps after which to stop: every eval step and a save every few chunks."""
  saves = range(chunk * every, run.total_steps, chunk * every)
  return sorted({s for s in (*run.eval_steps, *saves) if s > start})


def train_run(ctx: Context, programs, run: budget_lib.Run) -> dict:
  """Trains one run of one K for all lanes; returns its record.

  The run stops at every eval step (to evaluate) and every few chunks (to
  checkpoint). After each chunk it honours a preemption request by saving
  and raising `preemption.Preempted`.
  """
  ckpts = checkpoint.RunCheckpoints(
      os.path.join(ctx.workdir, 'checkpoints', _run_id(run))
  )
  state, progress = _restore_or_init(
      ckpts, programs, run, init_args(ctx, run.total_steps)
  )
  keys = data_keys(ctx)
  meter = metrics_lib.Progress(
      f'K={run.rank}', run.total_steps, int(state.step)
  )
  writer = metrics_lib.NullWriter()
  if environment.is_writer():
    writer = metrics_lib.MetricsWriter(
        ctx.workdir,
        run_id=_run_id(run),
        rank=run.rank,
        lanes=ctx.lanes,
        start_step=int(state.step),
        tensorboard=ctx.config.train.tensorboard,
    )
  stops = _boundaries(
      run,
      int(state.step),
      programs.chunk_steps,
      ctx.config.train.checkpoint_every_chunks,
  )
  try:
    while stops:
      step = int(state.step)
      n = min(programs.chunk_steps, stops[0] - step)
      start = time.perf_counter()
      state, losses = train_lib.advance(
          programs, state, ctx.base, ctx.train, keys, n
      )
      progress['train_seconds'] += time.perf_counter() - start
      progress['train_loss'] += [results_lib.finite_or_none(r) for r in losses]
      step += n
      writer.train(step, losses)
      meter.update(step, losses[-1])
      stopping = preemption.agreed()
      if step == stops[0]:
        stops.pop(0)
        if step in run.eval_steps:
          progress['eval'][str(step)] = _evaluate(ctx, programs, state)
          writer.eval(step, progress['eval'][str(step)])
        ckpts.save(step, state, progress)
      elif stopping:
        ckpts.save(step, state, progress)
      if stopping:
        ckpts.wait()
        raise preemption.Preempted(
            f'stopped at step {step} of {_run_id(run)} on SIGTERM; checkpoint'
            ' saved, rerun the same command to continue'
        )
  finally:
    writer.close()
    meter.close()
    ckpts.close()
  progress['status'] = np.asarray(state.status).tolist()
  progress['diverged_step'] = np.asarray(state.diverged_step).tolist()
  return progress


def _run_id(run: budget_lib.Run) -> str:
  return f'K{run.rank}_steps{run.total_steps}'


def _load_manifest(workdir: str) -> dict:
  path = os.path.join(workdir, 'manifest.json')
  if os.path.exists(path):
    return checkpoint.read_json(path)
  return dict(runs={}, compile_seconds={}, xla_flops_per_step={})


def _save_manifest(ctx: Context, manifest: dict) -> None:
  if environment.is_writer():
    checkpoint.write_json(os.path.join(ctx.workdir, 'manifest.json'), manifest)


def compile_all(ctx: Context, manifest: dict) -> dict:
  """Compiles every K that still has work (or needs calibrating)."""
  need_calibration = (
      ctx.config.studies.wallclock_matched.enabled
      and 'seconds_per_step' not in manifest
  )
  programs = {}
  for rank, runs in ctx.plan.runs.items():
    if need_calibration or any(
        _run_id(r) not in manifest['runs'] for r in runs
    ):
      programs[rank] = compile_rank(ctx, rank)
      manifest['compile_seconds'][str(rank)] = programs[rank].compile_seconds
      manifest['xla_flops_per_step'][str(rank)] = (
          train_lib.xla_flops_per_lane_step(
              programs[rank].train_chunk, len(ctx.lanes), ctx.place
          )
      )
  if need_calibration:
    steps = ctx.config.studies.wallclock_matched.calibration_steps
    calibrated = calibrate(ctx, programs, steps)
    manifest['seconds_per_step'] = {str(k): v for k, v in calibrated.items()}
    _save_manifest(ctx, manifest)
  return programs


def run_sweep(
    config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False
) -> dict:
  """Runs (or resumes) the whole sweep; writes every artifact to `workdir`.

  Every check of the user's input (config values, data file, base
  checkpoint, workdir) runs before anything is logged or computed.
  """
  validate.check_cpu_devices(config)
  environment.split_cpu_host(config)
  environment.initialize_distributed(config)
  validate.check_config(config)
  make_plan(config)  # a budget too small for some K fails here
  base_lib.check_checkpoint(config)
  check_workdir(config, workdir, overwrite=overwrite)
  environment.log_start(config)
  cache = environment.enable_compilation_cache(
      config.train.compilation_cache_dir
      or os.environ.get('JAX_COMPILATION_CACHE_DIR')
      or os.path.join(base_lib.cache_root(config), 'jax_cache')
  )
  logging.info('Compilation cache: %s', cache)
  with preemption.Guard():
    return _run_sweep(config, workdir)


def _apply_calibration(ctx: Context, manifest: dict) -> None:
  """Adds the wall-clock matched cells once seconds per step are known."""
  if 'seconds_per_step' in manifest:
    seconds = {int(k): v for k, v in manifest['seconds_per_step'].items()}
    ctx.plan = make_plan(ctx.config, seconds)
    ctx.flops_per_step = flops_lib.flops_per_step(ctx.config, ctx.plan.runs)


def _run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict:
  ctx = prepare(config, workdir)
  manifest = _load_manifest(workdir)
  _apply_calibration(ctx, manifest)  # a rerun plans with the stored timings
  programs = compile_all(ctx, manifest)
  _apply_calibration(ctx, manifest)
  log_plan(ctx.plan, ctx.base_info['max_rank'])
  if manifest.get('base_eval_loss') is None and programs:
    prog = next(iter(programs.values()))
    state = prog.init(*init_args(ctx, 1))  # B = 0: the untuned base
    manifest['base_eval_loss'] = _evaluate(ctx, prog, state)['report'][0]
  for rank, runs in ctx.plan.runs.items():
    for run in runs:
      if _run_id(run) in manifest['runs']:
        logging.info('%s finished earlier; skipping', _run_id(run))
        continue
      if rank not in programs:
        programs[rank] = compile_rank(ctx, rank)
      manifest['runs'][_run_id(run)] = train_run(ctx, programs[rank], run)
      _save_manifest(ctx, manifest)
  _save_manifest(ctx, manifest)
  results = results_lib.results_dict(ctx, manifest, _run_id)
  if environment.is_writer():
    for name, path in report.write_all(results, workdir).items():
      logging.info('Wrote %s: %s', name, path)
  return results


# Config keys added after workdirs were first written, with the value that
# stands for what those workdirs' code did, so that they still resume.
ADDED_KEYS = {('model', 'factor_grad'): 'custom'}


def _with_added_keys(stored: dict) -> dict:
  """A stored config with every missing ADDED_KEYS entry filled in."""
  for path, value in ADDED_KEYS.items():
    node = stored
    for key in path[:-1]:
      node = node.get(key)
      if not isinstance(node, dict):
        break
    else:
      node.setdefault(path[-1], value)
  return stored


def check_workdir(
    config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool
) -> None:
  """Creates the workdir, or refuses one made with a different config."""
  checkpoint.ensure_writable(workdir)
  path = os.path.join(workdir, 'config.json')
  new = json.loads(json.dumps(config.to_dict()))
  if os.path.exists(path) and not overwrite:
    old = _with_added_keys(checkpoint.read_json(path))
    differ = validate.differing_keys(old, new)
    if differ:
      raise errors.UserError(
          f'--workdir={workdir} holds a sweep with a different config (keys'
          f' {", ".join(differ)}); use a new workdir or pass --overwrite'
      )
  if overwrite:
    for name in ('manifest.json', 'results.json'):
      if os.path.exists(os.path.join(workdir, name)):
        os.remove(os.path.join(workdir, name))
    for name in (
        'checkpoints',
        metrics_lib.METRICS_DIR,
        metrics_lib.TENSORBOARD_DIR,
    ):
      shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
  if environment.is_writer():
    checkpoint.write_json(path, new)
