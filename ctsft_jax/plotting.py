"""Figures of a sweep, drawn from results.json alone (no training needed).

`draw_all(results, outdir)` draws every figure the results support, so a
notebook can redraw them from a saved results.json. Each `draw_*` function
takes the results dict and a path, and returns whether it drew anything: a
figure whose data the sweep did not produce (a study not run, no fitted
surface) is skipped, not drawn empty.
"""

import math
import os
import tempfile

import matplotlib

matplotlib.use('Agg')
from matplotlib import ticker  # pylint: disable=g-import-not-at-top
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from ctsft_jax import analysis

# Budget axis -> (label, study whose cells share a budget on it, unit).
AXES = {
    'param_steps': ('param-steps', 'budget_matched', 'param-steps'),
    'flops': ('model FLOPs', 'flops_matched', 'FLOPs'),
    'wall_s': ('wall-clock seconds', 'wallclock_matched', 's'),
}
# Budgets of the iso-budget curves of `draw_fit_surface`, in anchor units.
ISO_BUDGETS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# Window of the learning-curve moving average, as a share of the step.
SMOOTH_SHARE = 0.1


def save_figure(fig, path: str) -> None:
  """Saves a PNG atomically and closes the figure."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.png')
  os.close(fd)
  fig.savefig(tmp, dpi=120, bbox_inches='tight')
  plt.close(fig)
  os.replace(tmp, path)


def metric_of(results: dict) -> str:
  """The per-seed value the analysis used (final eval loss by default)."""
  return (results.get('analysis') or {}).get('metric', 'final_eval_loss')


def study_cells(results: dict, study: str) -> list[dict]:
  return [c for c in results.get('cells', []) if c['study'] == study]


def rank_colors(ranks) -> dict[int, tuple]:
  """One fixed color per K, in order of K, shared by every figure."""
  cmap = plt.get_cmap('tab10')
  return {k: cmap(i % 10) for i, k in enumerate(sorted(set(ranks)))}


def _all_ranks(results: dict) -> list[int]:
  return sorted({int(c['K']) for c in results.get('cells', [])})


def _summary(values) -> tuple[float, float, float]:
  """(mean, lower, upper) of the 95% interval; the mean when n < 2."""
  summary = analysis.mean_ci(values)
  mean, (lo, hi) = summary['mean'], summary['ci95']
  return (
      mean,
      (mean if math.isnan(lo) else lo),
      (mean if math.isnan(hi) else hi),
  )


def _mean_band(cells: list[dict], metric: str):
  ks, means, lows, highs = [], [], [], []
  for cell in sorted(cells, key=lambda c: c['K']):
    mean, lo, hi = _summary(cell[metric])
    ks.append(cell['K'])
    means.append(mean)
    lows.append(lo)
    highs.append(hi)
  return ks, means, lows, highs


def _log2_ticks(ax, ks) -> None:
  ax.set_xscale('log', base=2)
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.minorticks_off()


def draw_loss_vs_k(results: dict, path: str) -> bool:
  """Budget-matched final loss against K: mean, 95% CI band, seeds."""
  cells = study_cells(results, 'budget_matched')
  if not cells:
    return False
  metric = metric_of(results)
  fig, ax = plt.subplots(figsize=(6, 4))
  ks, means, lows, highs = _mean_band(cells, metric)
  ax.fill_between(ks, lows, highs, alpha=0.25, label='95% CI over seeds')
  ax.plot(ks, means, 'o-', label='mean')
  for cell in cells:
    values = [v for v in cell[metric] if v is not None]
    ax.scatter([cell['K']] * len(values), values, s=8, color='gray', zorder=3)
  _log2_ticks(ax, ks)
  ax.set_xlabel('K (rank), steps = budget / trainable_params(K)')
  ax.set_ylabel(f'{metric.replace("_", " ")} (nats/token)')
  ax.set_title(
      f"Budget-matched: {results['budget']['param_steps']:,} param-steps,"
      f" {len(results.get('seeds', []))} seeds"
  )
  ax.legend()
  ax.grid(alpha=0.3)
  save_figure(fig, path)
  return True


def _axis_series(results: dict, axis: str):
  """(K's, means, lows, highs, measured) of one axis's budget-matched curve.

  The cells of the axis's own study when it ran (exact step counts);
  otherwise the analysis's curve, interpolated in log(steps) between cells
  of the same K. None when neither exists.
  """
  cells = study_cells(results, AXES[axis][1])
  metric = metric_of(results)
  if cells:
    return (*_mean_band(cells, metric), True)
  curve = ((results.get('analysis') or {}).get('axes') or {}).get(axis)
  if not curve:
    return None
  rows = [r for r in curve['points'] if r.get('mean') is not None]
  if not rows:
    return None
  ks = [r['K'] for r in rows]
  means = [r['mean'] for r in rows]
  lows = [r['ci95'][0] if r['ci95'][0] is not None else r['mean'] for r in rows]
  highs = [
      r['ci95'][1] if r['ci95'][1] is not None else r['mean'] for r in rows
  ]
  return ks, means, lows, highs, False


def draw_loss_vs_k_axes(results: dict, path: str) -> bool:
  """Loss against K at the anchor budget on each budget axis, one panel each."""
  series = {axis: _axis_series(results, axis) for axis in AXES}
  if not any(series.values()):
    return False
  fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
  for ax, (axis, data) in zip(axes, series.items()):
    label, study, _ = AXES[axis]
    ax.set_title(f'equal {label}')
    ax.grid(alpha=0.3)
    ax.set_xlabel('K (rank)')
    if data is None:
      ax.text(
          0.5, 0.5, 'not run', ha='center', va='center', transform=ax.transAxes
      )
      continue
    ks, means, lows, highs, measured = data
    how = f'{study} cells' if measured else 'interpolated between cells'
    ax.fill_between(ks, lows, highs, alpha=0.25, label='95% CI over seeds')
    ax.plot(ks, means, 'o-' if measured else 'o--', label=f'mean ({how})')
    _log2_ticks(ax, ks)
    ax.legend(fontsize=8)
  axes[0].set_ylabel(f'{metric_of(results).replace("_", " ")} (nats/token)')
  fig.suptitle(
      'Budget-matched K curve on three budget axes (budget = anchor K at'
      ' anchor steps on each)'
  )
  save_figure(fig, path)
  return True


def smooth(values: np.ndarray, share: float = SMOOTH_SHARE) -> np.ndarray:
  """Trailing moving average whose window is `share` of the step index.

  The value at step t (1-based) is the mean of steps max(1, t - w + 1) .. t
  with w = max(1, round(share * t)), so early steps keep their detail on a
  log step axis and late steps are averaged over many. NaN entries count as
  missing.
  """
  values = np.asarray(values, dtype=float)
  finite = np.isfinite(values)
  sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
  counts = np.concatenate([[0], np.cumsum(finite)])
  t = np.arange(1, values.size + 1)
  width = np.maximum(1, np.round(share * t)).astype(int)
  start = t - width
  n = counts[t] - counts[start]
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(n > 0, (sums[t] - sums[start]) / np.maximum(n, 1), np.nan)


def _curve_lanes(results: dict, rank: int) -> list[int] | None:
  """Lanes of K's curve to average: the seeds at the K's chosen rate.

  The rate is the one most of the K's cells chose; None (all lanes) when
  the results do not name the lanes' rates.
  """
  lanes = results.get('lanes')
  if not lanes:
    return None
  chosen = [c.get('lr') for c in results.get('cells', []) if c['K'] == rank]
  chosen = [lr for lr in chosen if lr is not None]
  if not chosen:
    return None
  lr = max(set(chosen), key=chosen.count)
  return [i for i, lane in enumerate(lanes) if lane.get('lr') == lr] or None


def seed_mean_curve(results: dict, rank: int) -> np.ndarray:
  """Per step, the mean train loss over the seeds at K's chosen rate."""
  rows = results['curves'][str(rank)]
  values = np.array(
      [[np.nan if v is None else v for v in row] for row in rows], dtype=float
  ).reshape(len(rows), -1)
  lanes = _curve_lanes(results, rank)
  if lanes is not None:
    values = values[:, [i for i in lanes if i < values.shape[1]]]
  finite = np.isfinite(values)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(
        finite.any(axis=1),
        np.where(finite, values, 0).sum(1) / np.maximum(finite.sum(1), 1),
        np.nan,
    )


def draw_learning_curves(results: dict, path: str) -> bool:
  """Train loss against steps for every K: seed mean, smoothed, log steps."""
  curves = results.get('curves') or {}
  ranks = sorted(int(k) for k, rows in curves.items() if rows)
  if not ranks:
    return False
  colors = rank_colors(_all_ranks(results) or ranks)
  matched = {c['K']: c['steps'] for c in study_cells(results, 'budget_matched')}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for rank in ranks:
    mean = seed_mean_curve(results, rank)
    steps = np.arange(1, mean.size + 1)
    smoothed = smooth(mean)
    color = colors.get(rank)
    ax.plot(steps, mean, color=color, alpha=0.1, linewidth=0.6)
    ax.plot(steps, smoothed, color=color, label=f'K={rank}')
    if rank in matched and matched[rank] <= mean.size:
      s = matched[rank]
      ax.plot(s, smoothed[s - 1], 'o', color=color, markersize=5)
  ax.set_xscale('log')
  ax.set_xlabel('step')
  ax.set_ylabel('train loss (nats/token)')
  ax.set_title(
      'Learning curves: seed mean, moving average over the last'
      f' {SMOOTH_SHARE:.0%} of steps\n(faint: unsmoothed; dots: the'
      ' budget-matched step count)'
  )
  ax.legend(ncol=2, fontsize=8)
  ax.grid(alpha=0.3, which='both')
  save_figure(fig, path)
  return True


def crossover_rows(results: dict) -> list[dict]:
  """Per crossover pair s: param-steps, both K's summaries, paired diff."""
  metric = metric_of(results)
  by_pair = {}
  for cell in study_cells(results, 'crossover'):
    if 'pair' in cell:
      by_pair.setdefault(int(cell['pair']), {})[int(cell['K'])] = cell
  rows = []
  high, low = analysis.CROSS_HIGH_RANK, analysis.CROSS_LOW_RANK
  for s, cells in sorted(by_pair.items()):
    if high not in cells or low not in cells:
      continue
    high_values = analysis.seed_values(cells[high], metric)
    low_values = analysis.seed_values(cells[low], metric)
    diff = analysis.paired(high_values, low_values, n_boot=0)
    rows.append(
        {
            'pair': s,
            'param_steps': cells[high].get('param_steps', s),
            'high': _summary(high_values),
            'low': _summary(low_values),
            'diff': diff,
        }
    )
  return rows


def _first_win(results: dict, rows: list[dict]):
  cross = (results.get('analysis') or {}).get('crossover')
  if cross is not None:
    return cross.get('first_win_steps')
  wins = [r['pair'] for r in rows if r['diff']['mean_diff'] < 0]
  return wins[0] if wins else None


def _crossover_losses(ax, x, rows, colors) -> None:
  """Left panel: each K's mean loss with its 95% interval, per pair."""
  for key, rank in (
      ('high', analysis.CROSS_HIGH_RANK),
      ('low', analysis.CROSS_LOW_RANK),
  ):
    mean, lo, hi = (np.array(v) for v in zip(*[r[key] for r in rows]))
    ax.errorbar(
        x,
        mean,
        yerr=[mean - lo, hi - mean],
        fmt='o-',
        capsize=3,
        color=colors.get(rank),
        label=f'K={rank}',
    )
  for xi, row in zip(x, rows):
    ax.annotate(
        f's={row["pair"]}',
        (xi, row['high'][0]),
        fontsize=7,
        textcoords='offset points',
        xytext=(4, 4),
    )
  ax.set_title('Losses at equal param-steps (mean, 95% CI)')


def _crossover_diffs(ax, x, rows) -> None:
  """Right panel: the paired difference K=32 - K=2 with its interval."""
  diff = np.array([r['diff']['mean_diff'] for r in rows], dtype=float)
  ci = np.array([r['diff']['ci95'] for r in rows], dtype=float)
  ci = np.where(np.isfinite(ci), ci, diff[:, None])
  label = f'L(K={analysis.CROSS_HIGH_RANK}) - L(K={analysis.CROSS_LOW_RANK})'
  ax.errorbar(
      x,
      diff,
      yerr=[diff - ci[:, 0], ci[:, 1] - diff],
      fmt='o-',
      capsize=3,
      color='black',
      label=label,
  )
  ax.axhline(0.0, color='gray', linewidth=1)
  ax.set_ylabel('paired difference (below 0: K=32 wins)')
  ax.set_title('Paired difference, 95% CI over seeds')


def draw_crossover(results: dict, path: str) -> bool:
  """K=32 at s steps against K=2 at 16 s: losses and paired differences."""
  rows = crossover_rows(results)
  if not rows:
    return False
  high, low = analysis.CROSS_HIGH_RANK, analysis.CROSS_LOW_RANK
  x = np.array([r['param_steps'] for r in rows], dtype=float)
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  _crossover_losses(left, x, rows, rank_colors(_all_ranks(results)))
  _crossover_diffs(right, x, rows)
  first = _first_win(results, rows)
  for ax in (left, right):
    if first is not None:
      at = next(xi for xi, r in zip(x, rows) if r['pair'] == first)
      ax.axvline(
          at,
          color='green',
          linestyle=':',
          label=f'first K={high} win (s={first})',
      )
    ax.set_xscale('log')
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(f'param-steps (K={high} at s steps = K={low} at 16 s)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  left.set_ylabel(f'{metric_of(results).replace("_", " ")} (nats/token)')
  save_figure(fig, path)
  return True


def _fit_params(results: dict):
  """(form, formula, params in PARAM_NAMES order) of the chosen fit."""
  fit = (results.get('analysis') or {}).get('fit')
  if not fit or not fit.get('chosen'):
    return None
  form = fit['chosen']
  chosen = fit[form]
  names = analysis.PARAM_NAMES[form]
  params = [chosen['params'][n]['value'] for n in names]
  return form, chosen, params


def _params_per_rank(results: dict) -> float | None:
  """trainable_params / K, the same for every K (params are linear in K)."""
  ratios = [
      c['trainable_params'] / c['K']
      for c in results.get('cells', [])
      if c.get('trainable_params') and c['K']
  ]
  return float(np.mean(ratios)) if ratios else None


def draw_fit_surface(results: dict, path: str) -> bool:
  """Iso-budget curves of the fitted surface, with the measured points."""
  fitted = _fit_params(results)
  per_rank = _params_per_rank(results)
  if fitted is None or per_rank is None:
    return False
  form, chosen, params = fitted
  anchor = results['budget']['param_steps']
  ranks = _all_ranks(results)
  grid = np.geomspace(min(ranks), max(ranks), 100)
  metric = metric_of(results)
  cmap = plt.get_cmap('viridis')
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, multiple in enumerate(ISO_BUDGETS):
    budget = multiple * anchor
    color = cmap(i / max(1, len(ISO_BUDGETS) - 1))
    loss = analysis.surface(form, params, grid, budget / (per_rank * grid))
    ax.plot(grid, loss, color=color, label=f'{multiple:g}x anchor')
    cells = [
        c
        for c in results.get('cells', [])
        if abs(c.get('param_steps', 0) - budget) <= 0.01 * budget
    ]
    seen = set()
    for cell in cells:
      if cell['K'] in seen:
        continue
      seen.add(cell['K'])
      mean, lo, hi = _summary(cell[metric])
      ax.errorbar(
          cell['K'],
          mean,
          yerr=[[mean - lo], [hi - mean]],
          fmt='o',
          color=color,
          capsize=2,
          markersize=4,
      )
  _log2_ticks(ax, ranks)
  ax.set_xlabel('K (rank); steps = budget / trainable_params(K)')
  ax.set_ylabel(f'{metric.replace("_", " ")} (nats/token)')
  ax.set_title(
      f'Fitted {form} surface {chosen["formula"]} at fixed param-steps\n'
      f'(lines: fit; dots: measured cells, 95% CI); held-out RMSE'
      f' {chosen["rmse_loo"] or math.nan:.4f}'
  )
  ax.legend(fontsize=8, title='budget', ncol=2)
  ax.grid(alpha=0.3)
  save_figure(fig, path)
  return True


def axis_anchors(results: dict) -> dict[str, float]:
  """Axis -> the anchor budget on it: cost of anchor K x anchor steps."""
  costs = analysis.cost_per_step_of(results)
  rank = results['budget']['anchor_K']
  steps = results['budget']['anchor_steps']
  return {a: c[rank] * steps for a, c in costs.items() if rank in c}


def _band_row(ax, y, ranges, colors, x_lo, x_hi) -> None:
  """Colored bands of one rule on row y; ranges are (x_min, x_max, K)."""
  for x_min, x_max, rank in ranges:
    left, right = max(x_min, x_lo), min(x_max, x_hi)
    if right <= left:
      continue
    ax.barh(
        y,
        right - left,
        left=left,
        height=0.6,
        color=colors.get(rank),
        edgecolor='white',
    )
    ax.text(
        math.sqrt(left * right),
        y,
        f'K={rank}',
        ha='center',
        va='center',
        fontsize=8,
    )


def rule_rows(results: dict) -> list[tuple[str, list, list]]:
  """(label, ranges in anchor units, measured (x, K)) per row of the figure."""
  rule = (results.get('analysis') or {}).get('rule') or {}
  anchors = axis_anchors(results)
  rows = []
  for axis, (label, _, _) in AXES.items():
    if axis not in anchors:
      continue
    ranges = [
        (
            r['budget_min'] / anchors[axis],
            r['budget_max'] / anchors[axis],
            r['best_K'],
        )
        for r in rule.get('ranges', [])
        if r['axis'] == axis
    ]
    measured = [
        (m['budget'] / anchors[axis], m['best_K'])
        for m in rule.get('measured', [])
        if m['axis'] == axis
    ]
    if ranges or measured:
      rows.append((f'fitted, equal {label}', ranges, measured))
  paper = (rule.get('paper_rule') or {}).get('ranges', [])
  if paper:
    rows.append(
        (
            'paper 82 (param-steps)',
            [
                (
                    r['x_min'],
                    math.inf if r['x_max'] is None else r['x_max'],
                    r['best_K'],
                )
                for r in paper
            ],
            [],
        )
    )
  return rows


def draw_rule(results: dict, path: str) -> bool:
  """The derived K-budget rule per axis as bands, the paper's rule beneath."""
  rows = rule_rows(results)
  if not rows:
    return False
  xs = [
      x
      for _, ranges, _ in rows
      for lo, hi, _ in ranges
      for x in (lo, hi)
      if 0 < x < math.inf
  ]
  xs += [x for _, _, measured in rows for x, _ in measured]
  x_lo, x_hi = min(xs) / 2, max(xs) * 2
  ranks = {k for _, ranges, _ in rows for _, _, k in ranges}
  ranks |= {k for _, _, measured in rows for _, k in measured}
  colors = rank_colors(ranks | set(_all_ranks(results)))
  fig, ax = plt.subplots(figsize=(10, 1.0 + 0.7 * len(rows)))
  for i, (label, ranges, measured) in enumerate(rows):
    y = len(rows) - 1 - i
    _band_row(ax, y, ranges, colors, x_lo, x_hi)
    for x, rank in measured:
      ax.plot(x, y + 0.38, 'v', color='black', markersize=5)
      ax.text(x, y + 0.45, str(rank), ha='center', va='bottom', fontsize=7)
  ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)])
  ax.set_xscale('log')
  ax.set_xlim(x_lo, x_hi)
  ax.set_ylim(-0.5, len(rows) - 0.2)
  ax.set_xlabel('budget / anchor budget on the same axis')
  ax.set_title(
      'Best K by budget: fitted surface per axis (bands), measured best K'
      ' (triangles), paper 82'
  )
  ax.grid(alpha=0.3, axis='x')
  save_figure(fig, path)
  return True


FIGURES = {
    'loss_vs_k': draw_loss_vs_k,
    'loss_vs_k_axes': draw_loss_vs_k_axes,
    'learning_curves': draw_learning_curves,
    'crossover': draw_crossover,
    'fit_surface': draw_fit_surface,
    'rule': draw_rule,
}


def draw_all(results: dict, outdir: str) -> dict[str, str]:
  """Draws every figure the results support into `outdir`.

  Returns:
    Figure name -> path of its PNG, for the figures that were drawn.
  """
  os.makedirs(outdir, exist_ok=True)
  out = {}
  for name, draw in FIGURES.items():
    path = os.path.join(outdir, f'{name}.png')
    if draw(results, path):
      out[name] = path
  return out
