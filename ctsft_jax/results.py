"""The results store: one record per cell with every seed's losses.

A cell's record is built from the manifest record of the run that evaluated
it. With a learning-rate grid, the cell reports, for each seed, the lane
trained with the cell's selected rate: the rate whose mean loss over seeds on
the selection half of the eval set is lowest. Its reported losses come from
the other half, so the choice does not flatter the number it is judged by.
"""

import numpy as np

from ctsft_jax import analysis
from ctsft_jax import budget as budget_lib
from ctsft_jax import environment


def finite_or_none(values) -> list:
  """A JSON-safe list: non-finite values become None."""
  return [float(v) if np.isfinite(v) else None for v in np.asarray(values)]


def _window_mean(rows: list, steps: int) -> np.ndarray:
  """Per-lane mean train loss over the cell's last max(1, steps/10) steps."""
  width = max(1, round(steps / 10))
  window = np.array(
      [analysis.as_float_array(r) for r in rows[steps - width : steps]]
  )
  with np.errstate(all='ignore'):
    return np.nanmean(window, axis=0) if window.size else window


def _select_lr(ctx, evals: dict) -> tuple[int, dict]:
  """Index of the selected learning rate and each rate's selection loss."""
  n_lr = len(ctx.lrs)
  if 'select' not in evals:
    return 0, {}
  select = analysis.as_float_array(evals['select']).reshape(-1, n_lr)
  with np.errstate(all='ignore'):
    means = np.nanmean(select, axis=0)
  best = int(np.nanargmin(means)) if np.isfinite(means).any() else 0
  return best, {
      str(lr): finite_or_none([m])[0] for lr, m in zip(ctx.lrs, means)
  }


def cell_record(ctx, record: dict, cell: budget_lib.Cell, sec_per_step):
  """The results.json entry of one cell: its losses for every seed."""
  evals = record['eval'][str(cell.steps)]
  best, selection = _select_lr(ctx, evals)
  lanes = slice(best, None, len(ctx.lrs))  # one lane per seed
  diverged = [0 <= d < cell.steps for d in record['diverged_step'][lanes]]

  def per_seed(values):
    values = finite_or_none(np.asarray(values)[lanes])
    return [None if bad else v for v, bad in zip(values, diverged)]

  out = dict(
      study=cell.study,
      K=cell.rank,
      steps=cell.steps,
      trainable_params=ctx.plan.trainable[cell.rank],
      param_steps=ctx.plan.trainable[cell.rank] * cell.steps,
      flops=cell.steps * ctx.flops_per_step[cell.rank],
      wall_s=cell.steps * sec_per_step,
      lr=ctx.lrs[best],
      final_eval_loss=per_seed(analysis.as_float_array(evals['report'])),
      final_train_loss=per_seed(_window_mean(record['train_loss'], cell.steps)),
      status=['diverged' if bad else 'ok' for bad in diverged],
      diverged_step=[
          d if bad else None
          for d, bad in zip(record['diverged_step'][lanes], diverged)
      ],
  )
  if selection:
    out['lr_selection_loss'] = selection
  if cell.multiplier is not None:
    out['multiplier'] = cell.multiplier
  if cell.pair is not None:
    out['pair'] = cell.pair
  return out


def _run_of(plan: budget_lib.Plan, cell: budget_lib.Cell) -> budget_lib.Run:
  return next(r for r in plan.runs[cell.rank] if cell.steps in r.eval_steps)


def measured_seconds_per_step(ctx, manifest: dict, run_id) -> dict[int, float]:
  """Seconds of one train step of one lane, per K, measured while training."""
  out = {}
  for rank, runs in ctx.plan.runs.items():
    seconds = sum(manifest['runs'][run_id(r)]['train_seconds'] for r in runs)
    steps = sum(r.total_steps for r in runs)
    out[rank] = seconds / steps / len(ctx.lanes)
  return out


def results_dict(ctx, manifest: dict, run_id) -> dict:
  """Everything results.json holds: cells, curves, timing, provenance."""
  measured = measured_seconds_per_step(ctx, manifest, run_id)
  calibrated = {
      int(k): v for k, v in manifest.get('seconds_per_step', {}).items()
  }
  cells = [
      cell_record(
          ctx,
          manifest['runs'][run_id(_run_of(ctx.plan, c))],
          c,
          measured[c.rank],
      )
      for c in ctx.plan.cells
  ]
  costs = {
      'param_steps': dict(ctx.plan.trainable),
      'flops': dict(ctx.flops_per_step),
      'wall_s': calibrated or measured,
  }
  budget = dict(
      param_steps=ctx.plan.budget,
      anchor_K=ctx.config.budget.anchor_rank,
      anchor_steps=ctx.config.budget.anchor_steps,
  )
  return dict(
      config=ctx.config.to_dict(),
      environment=environment.describe(),
      data=ctx.data_info,
      base=ctx.base_info,
      seeds=list(ctx.seeds),
      learning_rates=list(ctx.lrs),
      lr_tuned_per_cell=len(ctx.lrs) > 1,
      budget=budget,
      prefix_shared=ctx.plan.prefix_shared,
      setup=budget_lib.setup_rows(ctx.plan),
      base_eval_loss=manifest.get('base_eval_loss'),
      cells=cells,
      curves={
          str(k): manifest['runs'][
              run_id(max(runs, key=lambda r: r.total_steps))
          ]['train_loss']
          for k, runs in ctx.plan.runs.items()
      },
      lanes=[dict(seed=s, lr=lr) for s, lr in ctx.lanes],
      timing=dict(
          compile_seconds=manifest['compile_seconds'],
          seconds_per_step_measured={str(k): v for k, v in measured.items()},
          seconds_per_step_calibrated={
              str(k): v for k, v in calibrated.items()
          },
          flops_per_step={str(k): v for k, v in ctx.flops_per_step.items()},
          xla_flops_per_step=manifest['xla_flops_per_step'],
      ),
      analysis=analysis.analyze(
          cells, budget, {a: dict(c) for a, c in costs.items()}
      ),
  )
