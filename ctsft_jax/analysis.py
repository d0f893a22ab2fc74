"""Statistics of a finished sweep: tables, paired tests, fits and verdicts.

Every function here is pure. The input is the sweep's cells, one dict per
(study, K, steps) point holding one value per seed; the output of `analyze` is
plain dicts and lists that `json.dumps(..., allow_nan=False)` can write
(missing numbers are None there; the building blocks return NaN instead).

Conventions used throughout:

* The confidence level is 95% everywhere. The interval of a mean is the
  Student t interval over seeds (Student, 1908). Two cells are compared with a
  paired t test on per-seed differences, and the probability that one side is
  lower comes from the percentile bootstrap over seeds (Efron & Tibshirani,
  1993, "An Introduction to the Bootstrap").
* Seed i is index i in every cell and saw the same data stream for every K, so
  two cells are compared pair by pair, on the seeds finite in both. A seed
  whose value is None or non-finite, or whose status is 'diverged', is
  dropped. Fewer than two usable pairs give NaN statistics (None in the JSON)
  and an `inconclusive` verdict.
* Bootstraps that span several cells (the surface fit, the first-win step of
  the crossover) draw one row of seed indices per replicate and apply it to
  every cell, so the pairing between cells survives resampling.
* A (K, steps) point measured by several studies (K=2 at 640 steps is in all
  three) is one point everywhere except in `tables`: its values come from the
  first study in `STUDY_ORDER` that has it.
"""

import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
from scipy import optimize
from scipy import stats

from ctsft_jax import errors

CONFIDENCE = 0.95
CONFIRMED, REFUTED, INCONCLUSIVE = 'confirmed', 'refuted', 'inconclusive'
METRICS = ('final_eval_loss', 'final_train_loss')
STUDY_ORDER = ('budget_matched', 'budget_multipliers', 'crossover')
# The two ranks of the crossover study: K=32 at s steps against K=2 at 16 s.
CROSS_HIGH_RANK, CROSS_LOW_RANK = 32, 2
# A budget's step count for a K counts as measured when a cell of that K lies
# within this relative distance of it (float round-off only).
STEP_RTOL = 1e-6
# Cells whose costs on an axis agree within this fraction share a budget.
SAME_BUDGET_RTOL = 0.01
# Upper bound of the fitted exponents alpha and beta; steeper power laws over
# K in [2, 64] are implausible and only absorb noise.
MAX_EXPONENT = 4.0
# Paper 82: K=32 x 40 steps x 1,536,992 params, and its hand-written rule as
# (lower bound, upper bound, K) in param-steps.
PAPER_ANCHOR_PARAM_STEPS = 40 * 1_536_992
PAPER_RULE = (
    (0.0, 30e6, 8),
    (30e6, 100e6, 32),
    (100e6, 400e6, 64),
    (400e6, math.inf, 2),
)
PARAM_NAMES = {
    'additive': ('E', 'A', 'alpha', 'B', 'beta'),
    'multiplicative': ('E', 'A', 'alpha', 'beta'),
}

Cells = Sequence[Mapping[str, Any]]
Points = dict[tuple[int, int], np.ndarray]


def _as_array(values) -> np.ndarray:
  """Floats with NaN for None and for non-finite entries."""
  out = np.array(
      [np.nan if v is None else v for v in values], dtype=float
  ).reshape(-1)
  out[~np.isfinite(out)] = np.nan
  return out


def seed_values(cell: Mapping[str, Any], metric: str) -> np.ndarray:
  """One value per seed of a cell; NaN where that seed is not usable."""
  out = _as_array(cell.get(metric) or [])
  status = list(cell.get('status') or [])
  for i, state in enumerate(status[: out.size]):
    if state == 'diverged':
      out[i] = np.nan
  return out


def mean_ci(values) -> dict:
  """Mean and 95% Student t interval over the finite values.

  The interval is mean +- t_{0.975, n-1} * sd / sqrt(n), with sd the sample
  standard deviation (ddof=1). It needs n >= 2; otherwise it is [NaN, NaN].

  Returns:
    {'mean', 'ci95': [lo, hi], 'n'}.
  """
  x = _as_array(values)
  x = x[np.isfinite(x)]
  n = int(x.size)
  mean = float(x.mean()) if n else math.nan
  if n < 2:
    return {'mean': mean, 'ci95': [math.nan, math.nan], 'n': n}
  half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * x.std(ddof=1) / n**0.5
  return {'mean': mean, 'ci95': [mean - half, mean + half], 'n': n}


def paired(a, b, *, n_boot: int = 2000, seed: int = 0) -> dict:
  """Paired comparison of a against b, seed by seed.

  Only seeds finite in both count. The difference is a - b, so a negative
  mean difference means a has the lower loss. The p-value is the two-sided
  paired t test (equal to `scipy.stats.ttest_rel`); when every difference is
  the same the test is degenerate and p is 1 for zero differences, else 0.
  `prob_a_lower` is the share of bootstrap resamples of the pairs whose mean
  difference is below zero (ties count one half).

  Returns:
    {'mean_diff', 'ci95': [lo, hi], 'p', 'n', 'prob_a_lower'}; NaN
    statistics when fewer than two pairs are usable.
  """
  diff = _as_array(a) - _as_array(b)
  diff = diff[np.isfinite(diff)]
  n = int(diff.size)
  out = {
      'mean_diff': math.nan,
      'ci95': [math.nan, math.nan],
      'p': math.nan,
      'n': n,
      'prob_a_lower': math.nan,
  }
  if n < 2:
    return out
  summary = mean_ci(diff)
  mean, sd = summary['mean'], diff.std(ddof=1)
  if sd == 0:
    p = 1.0 if mean == 0 else 0.0
  else:
    p = 2 * stats.t.sf(abs(mean) / (sd / n**0.5), n - 1)
  out.update(mean_diff=mean, ci95=summary['ci95'], p=float(p))
  if n_boot > 0:
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    prob = np.mean(boot < 0) + 0.5 * np.mean(boot == 0)
    out['prob_a_lower'] = float(prob)
  return out


def _row_means(values: np.ndarray) -> np.ndarray:
  """Mean of each row over its finite entries; NaN for an empty row."""
  finite = np.isfinite(values)
  counts = finite.sum(axis=-1)
  sums = np.where(finite, values, 0.0).sum(axis=-1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def count_seeds(cells: Cells, metric: str) -> int:
  """The number of seeds S, checked to be the same in every cell."""
  lengths = {len(c.get(metric) or []) for c in cells}
  if len(lengths) > 1:
    raise errors.UserError(
        f'cells hold {sorted(lengths)} values of {metric}; every cell needs'
        ' one per seed, the same number in all'
    )
  return lengths.pop() if lengths else 0


def collect_points(cells: Cells, metric: str) -> Points:
  """Per-seed values of every distinct (K, steps) point.

  A point measured by several studies takes the values of the first study in
  `STUDY_ORDER` that has it (under prefix sharing they are one measurement).
  """
  rank_of = {s: i for i, s in enumerate(STUDY_ORDER)}
  ordered = sorted(cells, key=lambda c: rank_of.get(c['study'], len(rank_of)))
  points = {}
  for cell in ordered:
    points.setdefault(
        (int(cell['K']), int(cell['steps'])), seed_values(cell, metric)
    )
  return points


def _table_row(cell: Mapping[str, Any]) -> dict:
  row = {'K': int(cell['K']), 'steps': int(cell['steps'])}
  for key in ('trainable_params', 'param_steps', 'flops', 'wall_s'):
    if key in cell:
      row[key] = cell[key]
  for key in ('multiplier', 'pair'):
    if key in cell:
      row[key] = cell[key]
  status = list(cell.get('status') or [])
  row['n_ok'] = status.count('ok')
  row['n_diverged'] = status.count('diverged')
  for metric in METRICS:
    if metric in cell:
      row[metric] = mean_ci(seed_values(cell, metric))
  return row


def tables(cells: Cells) -> dict:
  """Per study, one row per cell: K, steps, and mean with 95% CI per metric.

  `n_ok` and `n_diverged` count the seeds by status; each metric's `n` counts
  the seeds with a usable value.
  """
  out = {}
  for cell in cells:
    out.setdefault(cell['study'], []).append(_table_row(cell))
  for rows in out.values():
    rows.sort(key=lambda r: (r.get('pair', 0), r['K'], r['steps']))
  return out


def values_at_steps(by_steps: Mapping[int, np.ndarray], target: float):
  """Per-seed values of one K at `target` steps, measured or interpolated.

  A cell within `STEP_RTOL` of `target` is used as is. Otherwise each seed's
  value is interpolated linearly in log(steps) between the two measured cells
  of this K that bracket `target` (seeds missing in either give NaN). Outside
  the measured range nothing is returned: a power law in steps does not
  extrapolate reliably.

  Returns:
    (values or None, interpolated, (steps_lo, steps_hi) or None).
  """
  steps = sorted(by_steps)
  for s in steps:
    if abs(s - target) <= STEP_RTOL * target:
      return by_steps[s], False, (s, s)
  if not steps or target < steps[0] or target > steps[-1]:
    return None, False, None
  hi = next(i for i, s in enumerate(steps) if s > target)
  s_lo, s_hi = steps[hi - 1], steps[hi]
  w = math.log(target / s_lo) / math.log(s_hi / s_lo)
  values = (1 - w) * by_steps[s_lo] + w * by_steps[s_hi]
  return values, True, (s_lo, s_hi)


def budget_curve(
    points: Points, cost: Mapping[int, float], anchor_rank: int, anchor_steps
) -> dict | None:
  """The budget-matched curve on one budget axis.

  The budget is cost[anchor_K] * anchor_steps; each K gets
  steps(K) = budget / cost[K], and its loss there from `values_at_steps`.
  `best_K` (lowest mean) needs at least two available K's. None when the
  anchor K has no cost on this axis.
  """
  if anchor_rank not in cost:
    return None
  budget = cost[anchor_rank] * anchor_steps
  rows = []
  for rank in sorted(cost):
    by_steps = {s: v for (k, s), v in points.items() if k == rank}
    target = budget / cost[rank]
    values, interpolated, bracket = values_at_steps(by_steps, target)
    row = {'K': rank, 'steps': target, 'available': values is not None}
    row['interpolated'] = interpolated
    row['bracket_steps'] = list(bracket) if bracket else None
    row.update(mean_ci(values if values is not None else []))
    rows.append(row)
  usable = [r for r in rows if np.isfinite(r['mean'])]
  best = None
  if len(usable) >= 2:
    best = min(usable, key=lambda r: r['mean'])['K']
  return {'budget': budget, 'points': rows, 'best_K': best}


def surface(form: str, params, rank, steps) -> np.ndarray:
  """Loss surface L(K, S) of a fitted form.

  `additive` is E + A K^-alpha + B S^-beta, the two-term power law of
  Hoffmann et al. (2022, "Training Compute-Optimal Large Language Models")
  with rank in place of model size and steps in place of tokens.
  `multiplicative` is E + A K^-alpha S^-beta, one term in both.
  """
  rank = np.asarray(rank, dtype=float)
  steps = np.asarray(steps, dtype=float)
  if form == 'additive':
    e, a, alpha, b, beta = params
    return e + a * rank**-alpha + b * steps**-beta
  if form == 'multiplicative':
    e, a, alpha, beta = params
    return e + a * rank**-alpha * steps**-beta
  raise ValueError(f'form={form!r} is not one of {sorted(PARAM_NAMES)}')


def _starts(form: str, rank, steps, loss) -> list[np.ndarray]:
  """A few initial points spread over plausible exponents."""
  spread = max(float(np.ptp(loss)), 1e-3)
  e0 = max(float(loss.min()) - 0.5 * spread, 0.0)
  k0, s0 = float(rank.min()), float(steps.min())
  out = []
  for alpha in (0.3, 1.0):
    for beta in (0.3, 1.0):
      if form == 'additive':
        out.append([e0, spread * k0**alpha, alpha, spread * s0**beta, beta])
      else:
        out.append([e0, spread * k0**alpha * s0**beta, alpha, beta])
  return [np.array(x) for x in out]


def fit_surface(
    rank, steps, loss, *, form: str = 'additive', x0=None
) -> np.ndarray | None:
  """Least-squares fit of `surface(form, ...)` to per-cell mean losses.

  Uses the trust-region reflective method of `scipy.optimize.least_squares`
  (Branch, Coleman & Li, 1999) with every parameter >= 0 (losses, as
  cross-entropies, are >= 0 and fall with K and steps) and the exponents
  <= `MAX_EXPONENT`. Cells are weighted equally. Without `x0`, the best of a
  few starts is kept; with it (bootstrap and leave-one-out refits) only `x0`.

  Returns:
    The parameters in the order of `PARAM_NAMES[form]`, or None when there
    are not more points than parameters.
  """
  rank, steps, loss = (np.asarray(x, dtype=float) for x in (rank, steps, loss))
  names = PARAM_NAMES[form]
  if loss.size <= len(names):
    return None
  lower = np.zeros(len(names))
  upper = np.array(
      [MAX_EXPONENT if n in ('alpha', 'beta') else np.inf for n in names]
  )
  starts = (
      [np.asarray(x0)] if x0 is not None else _starts(form, rank, steps, loss)
  )
  best = None
  for start in starts:
    result = optimize.least_squares(
        lambda p: surface(form, p, rank, steps) - loss,
        np.clip(start, lower, upper),
        bounds=(lower, upper),
        x_scale='jac',
    )
    if best is None or result.cost < best.cost:
      best = result
  return best.x


class SurfaceFit(NamedTuple):
  """One fitted form with its uncertainty and held-out error."""

  form: str
  params: np.ndarray  # (n_params,) in the order of PARAM_NAMES[form].
  boot_params: np.ndarray  # (n_refits, n_params) seed-resample refits.
  rmse_in_sample: float
  rmse_loo: float  # Leave-one-(K, steps)-point-out prediction RMSE.
  n_points: int


def _rmse(x) -> float:
  x = np.asarray(x, dtype=float)
  return float(np.sqrt(np.mean(x**2))) if x.size else math.nan


def _loo_rmse(form, params, rank, steps, loss) -> float:
  """Refit without each point in turn (Stone, 1974) and predict it."""
  errs = []
  for i in range(loss.size):
    keep = np.arange(loss.size) != i
    refit = fit_surface(
        rank[keep], steps[keep], loss[keep], form=form, x0=params
    )
    if refit is not None:
      errs.append(surface(form, refit, rank[i], steps[i]) - loss[i])
  return _rmse(errs)


def _bootstrap_fits(form, params, rank, steps, values, boot_idx) -> np.ndarray:
  """Refits on seed resamples; one index row per replicate, every cell."""
  refits = []
  for row in boot_idx:
    loss = _row_means(values[:, row])
    keep = np.isfinite(loss)
    refit = fit_surface(
        rank[keep], steps[keep], loss[keep], form=form, x0=params
    )
    if refit is not None:
      refits.append(refit)
  return np.array(refits, dtype=float).reshape(-1, len(params))


def separable(rank, steps) -> bool:
  """Whether the cells vary K and steps independently of each other.

  The budget-matched cells alone have K * steps constant, so a K term and a
  steps term of the surface cannot be told apart; such a design is not fit.
  """
  design = np.stack([np.ones(len(rank)), np.log(rank), np.log(steps)], axis=1)
  return len(rank) >= 3 and np.linalg.matrix_rank(design) == 3


def fit_form(form: str, points: Points, boot_idx: np.ndarray):
  """Fits one form to every point's seed mean.

  None when there are no more points than parameters, or when the points
  are not `separable`.
  """
  keys = [k for k, v in points.items() if np.isfinite(v).any()]
  if not keys:
    return None
  rank = np.array([k for k, _ in keys], dtype=float)
  steps = np.array([s for _, s in keys], dtype=float)
  values = np.stack([points[k] for k in keys])
  loss = _row_means(values)
  if not separable(rank, steps):
    return None
  params = fit_surface(rank, steps, loss, form=form)
  if params is None:
    return None
  return SurfaceFit(
      form=form,
      params=params,
      boot_params=_bootstrap_fits(form, params, rank, steps, values, boot_idx),
      rmse_in_sample=_rmse(surface(form, params, rank, steps) - loss),
      rmse_loo=_loo_rmse(form, params, rank, steps, loss),
      n_points=len(keys),
  )


def choose_fit(fits: Mapping[str, SurfaceFit | None]) -> SurfaceFit | None:
  """The fit with the lowest leave-one-out RMSE.

  The in-sample RMSE breaks ties, and decides when no held-out error could
  be computed.
  """
  usable = [f for f in fits.values() if f is not None]
  if not usable:
    return None
  inf = math.inf
  return min(
      usable,
      key=lambda f: (
          f.rmse_loo if np.isfinite(f.rmse_loo) else inf,
          f.rmse_in_sample,
      ),
  )


def _fit_report(fit: SurfaceFit | None) -> dict | None:
  if fit is None:
    return None
  params = {}
  tail = (1 - CONFIDENCE) / 2
  for i, name in enumerate(PARAM_NAMES[fit.form]):
    boot = fit.boot_params[:, i]
    entry = {'value': float(fit.params[i]), 'std': math.nan}
    entry['ci95'] = [math.nan, math.nan]
    if boot.size >= 2:
      entry['std'] = float(boot.std(ddof=1))
      entry['ci95'] = [float(q) for q in np.quantile(boot, [tail, 1 - tail])]
    params[name] = entry
  return {
      'formula': {
          'additive': 'E + A*K^-alpha + B*S^-beta',
          'multiplicative': 'E + A*K^-alpha*S^-beta',
      }[fit.form],
      'params': params,
      'rmse_in_sample': fit.rmse_in_sample,
      'rmse_loo': fit.rmse_loo,
      'n_points': fit.n_points,
      'n_boot_refits': int(fit.boot_params.shape[0]),
  }


def best_ranks(
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
    ranks: Sequence[int],
    cost: Mapping[int, float],
    budgets,
) -> np.ndarray:
  """argmin over `ranks` of predict(K, budget / cost[K]), for each budget."""
  ranks = np.asarray(sorted(ranks))
  per_step = np.array([cost[int(k)] for k in ranks], dtype=float)
  steps = np.asarray(budgets, dtype=float)[None, :] / per_step[:, None]
  loss = predict(ranks[:, None].astype(float), steps)
  return ranks[np.argmin(loss, axis=0)]


def derive_rule(
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
    ranks: Sequence[int],
    cost: Mapping[int, float],
    budgets,
    *,
    axis: str = 'param_steps',
) -> dict:
  """The K-budget rule of a loss surface on one budget axis.

  For each budget B of the grid `budgets` (ascending), the best K is
  argmin_K predict(K, B / cost[K]) over `ranks`. Runs of grid points with the
  same best K become one range. Where the best K changes between grid points
  b_i and b_{i+1}, the crossover is placed at sqrt(b_i * b_{i+1}), so it is
  within one grid step of the exact one; ranges meet at the crossovers.

  Returns:
    {'ranges': [{'budget_min', 'budget_max', 'best_K', 'axis'}],
     'crossovers': [{'budget', 'from_K', 'to_K', 'axis'}]}.
  """
  budgets = np.asarray(budgets, dtype=float)
  best = best_ranks(predict, ranks, cost, budgets)
  ranges, crossovers = [], []
  start = float(budgets[0])
  for i in range(1, budgets.size + 1):
    if i < budgets.size and best[i] == best[i - 1]:
      continue
    end = float(budgets[-1])
    if i < budgets.size:
      end = float(np.sqrt(budgets[i - 1] * budgets[i]))
      crossovers.append(
          {
              'budget': end,
              'from_K': int(best[i - 1]),
              'to_K': int(best[i]),
              'axis': axis,
          }
      )
    ranges.append(
        {
            'budget_min': start,
            'budget_max': end,
            'best_K': int(best[i - 1]),
            'axis': axis,
        }
    )
    start = end
  return {'ranges': ranges, 'crossovers': crossovers}


def budget_grid(points: Points, cost: Mapping[int, float], n: int = 121):
  """Log-spaced budgets from half the cheapest to twice the dearest cell."""
  spent = [cost[k] * s for (k, s) in points if k in cost]
  if not spent:
    return None
  return np.geomspace(min(spent) / 2, max(spent) * 2, n)


def measured_best(
    points: Points, cost: Mapping[int, float], axis: str, *, n_boot, seed
) -> list[dict]:
  """Budgets where >= 2 K's were measured at (nearly) the same cost.

  Cells are grouped when their cost on `axis` lies within `SAME_BUDGET_RTOL`
  of the cheapest cell of the group; the lowest mean loss names the measured
  best K, and it is compared, paired, with the runner-up.
  """
  entries = sorted(
      (cost[k] * s, k, s)
      for (k, s), v in points.items()
      if k in cost and np.isfinite(v).any()
  )
  groups = []
  for entry in entries:
    if groups and entry[0] <= groups[-1][0][0] * (1 + SAME_BUDGET_RTOL):
      groups[-1].append(entry)
    else:
      groups.append([entry])
  out = []
  for group in groups:
    by_rank = {}
    for spent, k, s in group:
      by_rank.setdefault(k, (spent, s))
    if len(by_rank) < 2:
      continue
    losses = [
        {'K': k, 'steps': s, 'mean': float(np.nanmean(points[(k, s)]))}
        for k, (_, s) in sorted(by_rank.items())
    ]
    first, second = sorted(losses, key=lambda r: r['mean'])[:2]
    out.append(
        {
            'axis': axis,
            'budget': float(np.exp(np.mean([np.log(e[0]) for e in group]))),
            'best_K': first['K'],
            'losses': losses,
            'best_vs_runner_up': paired(
                points[(first['K'], first['steps'])],
                points[(second['K'], second['steps'])],
                n_boot=n_boot,
                seed=seed,
            ),
        }
    )
  return out


def paper_k(multiple_of_anchor: float) -> int:
  """The K that paper 82's rule picks at a budget given in anchor units."""
  budget = multiple_of_anchor * PAPER_ANCHOR_PARAM_STEPS
  if budget < 30e6:
    return 8
  if budget < 100e6:
    return 32
  if budget > 400e6:
    return 2
  return 64


def paper_rule(anchors: Mapping[str, float]) -> dict:
  """Paper 82's rule as multiples of its anchor budget, and on each axis.

  The paper states <30M -> K=8, <100M -> K=32, >400M -> K=2, else K=64, for
  an anchor of 61.5M param-steps: 0.488x, 1.627x and 6.506x the anchor.
  Here the same multiples are applied to each axis's own anchor budget.
  """
  ranges = []
  for lower, upper, rank in PAPER_RULE:
    ranges.append(
        {
            'x_min': lower / PAPER_ANCHOR_PARAM_STEPS,
            'x_max': upper / PAPER_ANCHOR_PARAM_STEPS,
            'best_K': rank,
        }
    )
  per_axis = {
      axis: [
          {
              'budget_min': r['x_min'] * anchor,
              'budget_max': r['x_max'] * anchor,
              'best_K': r['best_K'],
              'axis': axis,
          }
          for r in ranges
      ]
      for axis, anchor in anchors.items()
  }
  return {
      'anchor_param_steps': PAPER_ANCHOR_PARAM_STEPS,
      'ranges': ranges,
      'per_axis': per_axis,
  }


class _RuleContext(NamedTuple):
  """What the verdict on the rule needs from the rule section."""

  grid: np.ndarray | None  # (n,) param_steps budgets, ascending.
  ranks: list[int]
  cost: Mapping[int, float] | None


def rule_section(points, fit, costs, budget, *, n_boot, seed):
  """The fitted rule, the measured best K's and the paper's rule.

  The fitted rule is `derive_rule` of the chosen fit on each axis, over the
  measured K's, on the `budget_grid` of that axis. `agreement_with_paper`
  is the share of grid budgets where it picks the paper's K.

  Returns:
    (the JSON section, the context the rule verdict needs).
  """
  usable = {key: v for key, v in points.items() if np.isfinite(v).any()}
  anchor_rank, anchor_steps = budget['anchor_K'], budget['anchor_steps']
  anchors = {
      a: c[anchor_rank] * anchor_steps
      for a, c in costs.items()
      if anchor_rank in c
  }
  out = {'form': fit.form if fit else None, 'ranges': [], 'crossovers': []}
  out.update(measured=[], grids={}, agreement_with_paper={})
  context = _RuleContext(None, [], None)
  for axis, cost in costs.items():
    out['measured'] += measured_best(
        usable, cost, axis, n_boot=n_boot, seed=seed
    )
    ranks = sorted({k for k, _ in usable if k in cost})
    grid = budget_grid(usable, cost)
    if fit is None or grid is None:
      continue
    predict = functools.partial(surface, fit.form, fit.params)
    rule = derive_rule(predict, ranks, cost, grid, axis=axis)
    out['ranges'] += rule['ranges']
    out['crossovers'] += rule['crossovers']
    out['grids'][axis] = {'min': grid[0], 'max': grid[-1], 'n': grid.size}
    if axis in anchors:
      fitted = best_ranks(predict, ranks, cost, grid)
      paper = [paper_k(b / anchors[axis]) for b in grid]
      out['agreement_with_paper'][axis] = float(np.mean(fitted == paper))
    if axis == 'param_steps':
      context = _RuleContext(grid, ranks, cost)
  out['paper_rule'] = paper_rule(anchors)
  return out, context


def _crossover_pairs(cells: Cells, metric: str) -> list[tuple]:
  """(s, K=32 values, K=2 values, K=2 steps) for each complete pair s."""
  by_pair = {}
  for cell in cells:
    if cell['study'] == 'crossover' and 'pair' in cell:
      by_pair.setdefault(int(cell['pair']), {})[int(cell['K'])] = cell
  out = []
  for s, by_rank in sorted(by_pair.items()):
    if CROSS_HIGH_RANK in by_rank and CROSS_LOW_RANK in by_rank:
      low = by_rank[CROSS_LOW_RANK]
      out.append(
          (
              s,
              seed_values(by_rank[CROSS_HIGH_RANK], metric),
              seed_values(low, metric),
              int(low['steps']),
          )
      )
  return out


def _first_win_bootstrap(pairs, boot_idx) -> dict:
  """Distribution of the first s at which K=32's mean loss is lower."""
  steps = [p[0] for p in pairs]
  diffs = np.stack([p[1] - p[2] for p in pairs])
  firsts = []
  for row in boot_idx:
    wins = _row_means(diffs[:, row]) < 0
    firsts.append(steps[int(np.argmax(wins))] if wins.any() else math.inf)
  firsts = np.array(firsts, dtype=float)
  if not firsts.size:
    return {'ci95': [math.nan, math.nan], 'prob': {}, 'prob_never': math.nan}
  tail = (1 - CONFIDENCE) / 2
  bounds = np.quantile(firsts, [tail, 1 - tail], method='inverted_cdf')
  return {
      'ci95': [int(b) if np.isfinite(b) else None for b in bounds],
      'prob': {str(s): float(np.mean(firsts == s)) for s in steps},
      'prob_never': float(np.mean(np.isinf(firsts))),
  }


def crossover_section(cells, metric, boot_idx, *, n_boot, seed):
  """Paired K=32(s) - K=2(16 s) differences and the first winning s.

  `first_win_steps` is the smallest s whose mean difference over the seeds
  finite in both cells is below zero (None if none is; one pair suffices,
  as in the bootstrap). Its bootstrap redoes that choice on seed
  resamples; `first_win_bootstrap.ci95` is the 95% percentile interval of
  s, where an upper end of None means "no win in the measured range", and
  `prob` the share of resamples whose first win is each s.
  """
  pairs = _crossover_pairs(cells, metric)
  if not pairs:
    return None
  rows, first_win = [], None
  for s, high, low, low_steps in pairs:
    cmp = paired(high, low, n_boot=n_boot, seed=seed)
    rows.append(
        {
            'pair': s,
            'steps_K32': s,
            'steps_K2': low_steps,
            'mean_K32': mean_ci(high)['mean'],
            'mean_K2': mean_ci(low)['mean'],
            'diff': cmp['mean_diff'],
            'ci95': cmp['ci95'],
            'p': cmp['p'],
            'prob_K32_wins': cmp['prob_a_lower'],
            'n': cmp['n'],
        }
    )
    if first_win is None and _row_means(high - low) < 0:
      first_win = s
  return {
      'pairs': rows,
      'first_win_steps': first_win,
      'first_win_bootstrap': _first_win_bootstrap(pairs, boot_idx),
  }


def _fmt(cmp: Mapping[str, Any], label: str) -> str:
  """'label +0.0210 [+0.0040, +0.0380], p=0.02, n=8' or 'label n/a'."""
  if not np.isfinite(cmp['mean_diff']):
    return f'{label} n/a (n={cmp["n"]})'
  lo, hi = cmp['ci95']
  return (
      f'{label} {cmp["mean_diff"]:+.4f} [{lo:+.4f}, {hi:+.4f}],'
      f' p={cmp["p"]:.2g}, n={cmp["n"]}'
  )


def _lo(cmp) -> float:
  return cmp['ci95'][0]


def _hi(cmp) -> float:
  return cmp['ci95'][1]


def _verdict(claim, verdict, statistic, n_seeds) -> dict:
  return {
      'claim': claim,
      'verdict': verdict,
      'statistic': statistic,
      'n_seeds': int(n_seeds),
  }


def verdict_dip(matched: Mapping[int, np.ndarray], *, n_boot, seed) -> dict:
  """Claim 1: K=16 is a local loss maximum of the budget-matched curve.

  Confirmed when L16 - L8 and L16 - L32 both have paired 95% CIs above zero;
  refuted when either CI is entirely below zero; else inconclusive.
  """
  claim = 'K=16 is a local loss maximum of the budget-matched curve'
  if any(k not in matched for k in (8, 16, 32)):
    return _verdict(claim, INCONCLUSIVE, 'not run', 0)
  vs8 = paired(matched[16], matched[8], n_boot=n_boot, seed=seed)
  vs32 = paired(matched[16], matched[32], n_boot=n_boot, seed=seed)
  if _lo(vs8) > 0 and _lo(vs32) > 0:
    verdict = CONFIRMED
  elif _hi(vs8) < 0 or _hi(vs32) < 0:
    verdict = REFUTED
  else:
    verdict = INCONCLUSIVE
  text = f'{_fmt(vs8, "L16-L8")}; {_fmt(vs32, "L16-L32")}'
  return _verdict(claim, verdict, text, min(vs8['n'], vs32['n']))


def verdict_crossover(cross: Mapping[str, Any] | None) -> dict:
  """Claim 2: K=32 loses to K=2 at s=10 and wins at s=20 (paired, 16x steps).

  Confirmed when the K32 - K2 CI at s=20 is below zero and the one at s=10
  is not; refuted when K=32 significantly wins at s=10 or significantly
  loses at s=20; else inconclusive (also when either pair is missing).
  """
  claim = 'K=32 first beats K=2 (at 16x the steps) at 20 steps, not at 10'
  if cross is None:
    return _verdict(claim, INCONCLUSIVE, 'not run', 0)
  rows = {r['pair']: r for r in cross['pairs']}
  if 10 not in rows or 20 not in rows:
    return _verdict(claim, INCONCLUSIVE, 'not run (no s=10 or s=20 pair)', 0)
  at10, at20 = (
      {'mean_diff': r['diff'], 'ci95': r['ci95'], 'p': r['p'], 'n': r['n']}
      for r in (rows[10], rows[20])
  )
  if _hi(at10) < 0 or _lo(at20) > 0:
    verdict = REFUTED
  elif _hi(at20) < 0 and np.isfinite(_hi(at10)):
    verdict = CONFIRMED
  else:
    verdict = INCONCLUSIVE
  boot = cross['first_win_bootstrap']
  text = (
      f'{_fmt(at10, "s=10 K32-K2")}; {_fmt(at20, "s=20 K32-K2")};'
      f' first win s={cross["first_win_steps"]}, bootstrap 95% interval'
      f' {boot["ci95"]}'
  )
  return _verdict(claim, verdict, text, min(at10['n'], at20['n']))


def verdict_multiplier(cells, points, budget, metric, *, n_boot, seed):
  """Claim 3: K=2 at 4x the budget beats K=32 at the anchor.

  Paired diff L(K=2, 4x) - L(anchor) with CI below zero -> confirmed,
  above zero -> refuted, else inconclusive.
  """
  claim = 'K=2 at 4x the budget (2,560 steps) beats K=32 at the anchor'
  four = [
      c
      for c in cells
      if c['study'] == 'budget_multipliers'
      and int(c['K']) == CROSS_LOW_RANK
      and float(c.get('multiplier', 0)) == 4
  ]
  anchor = points.get((budget['anchor_K'], budget['anchor_steps']))
  if not four or anchor is None:
    return _verdict(claim, INCONCLUSIVE, 'not run', 0)
  cmp = paired(seed_values(four[0], metric), anchor, n_boot=n_boot, seed=seed)
  if _hi(cmp) < 0:
    verdict = CONFIRMED
  elif _lo(cmp) > 0:
    verdict = REFUTED
  else:
    verdict = INCONCLUSIVE
  label = f'L(K=2,{int(four[0]["steps"])})-L(K={budget["anchor_K"]},anchor)'
  return _verdict(claim, verdict, _fmt(cmp, label), cmp['n'])


def verdict_k64(matched: Mapping[int, np.ndarray], *, n_boot, seed) -> dict:
  """Claim 4: K=64 has the lowest loss at budget parity.

  Confirmed when L64 - LK has a paired CI below zero for every other K;
  refuted when some K is significantly better than K=64; else inconclusive.
  The statistic names the runner-up (the other K with the lowest mean).
  """
  claim = 'K=64 has the lowest loss at budget parity'
  others = [k for k in sorted(matched) if k != 64]
  if 64 not in matched or not others:
    return _verdict(claim, INCONCLUSIVE, 'not run', 0)
  cmps = {
      k: paired(matched[64], matched[k], n_boot=n_boot, seed=seed)
      for k in others
  }
  means = {k: mean_ci(matched[k])['mean'] for k in others}
  finite = [k for k in others if np.isfinite(means[k])]
  runner = min(finite, key=means.get) if finite else others[0]
  better = [k for k in others if _lo(cmps[k]) > 0]
  if better:
    verdict = REFUTED
  elif all(_hi(c) < 0 for c in cmps.values()):
    verdict = CONFIRMED
  else:
    verdict = INCONCLUSIVE
  text = f'runner-up K={runner}: {_fmt(cmps[runner], f"L64-L{runner}")}'
  if better:
    text += f'; significantly better than K=64: {better}'
  tied = [k for k in others if not _hi(cmps[k]) < 0 and k not in better]
  if tied and not better:
    text += f'; K=64 not significantly better than K in {tied}'
  return _verdict(claim, verdict, text, min(c['n'] for c in cmps.values()))


def verdict_rule_falls(
    fit: SurfaceFit | None, context: _RuleContext, n_seeds: int
) -> dict:
  """Claim 5: the optimal K falls as the budget grows (param_steps axis).

  From the chosen fit's rule: the best K at the smallest and the largest
  grid budget. On each bootstrap refit, the best-K sequence over the grid
  "falls" when it never rises and ends lower, and "rises" when it never
  falls and ends higher. Confirmed when the point estimate ends lower and
  P(falls) >= 0.95; refuted when P(rises) >= 0.95; else inconclusive.

  NOTE: neither fitted form can make the best K fall, on any axis whose cost
  per step grows with K. In the additive form the budget only scales the
  steps term, whose weight in K grows with K, so the optimum moves up (as
  budget^(beta / (alpha + beta)) when cost is linear in K); in the
  multiplicative form the budget is a common factor, so the best K is the
  same at every budget. Under these forms this claim can be refuted or left
  inconclusive but never confirmed; confirming it needs a surface with a
  K-steps interaction.
  """
  claim = 'The optimal K falls as the budget grows (param_steps axis)'
  if fit is None or context.grid is None:
    return _verdict(
        claim,
        INCONCLUSIVE,
        'no fit: too few cells, or K * steps constant in all of them',
        0,
    )
  grid, ranks, cost = context

  def best_of(params):
    predict = functools.partial(surface, fit.form, params)
    return best_ranks(predict, ranks, cost, grid)

  point = best_of(fit.params)
  falls, rises = [], []
  for params in fit.boot_params:
    changes = np.diff(best_of(params))
    falls.append(np.all(changes <= 0) and changes.sum() < 0)
    rises.append(np.all(changes >= 0) and changes.sum() > 0)
  p_falls = float(np.mean(falls)) if falls else math.nan
  p_rises = float(np.mean(rises)) if rises else math.nan
  if point[-1] < point[0] and p_falls >= CONFIDENCE:
    verdict = CONFIRMED
  elif p_rises >= CONFIDENCE:
    verdict = REFUTED
  else:
    verdict = INCONCLUSIVE
  text = (
      f'{fit.form} fit: best K={point[0]} at {grid[0]:.3g} -> K={point[-1]}'
      f' at {grid[-1]:.3g} param-steps; bootstrap P(falls)={p_falls:.2f},'
      f' P(rises)={p_rises:.2f} over {len(falls)} refits'
  )
  return _verdict(claim, verdict, text, n_seeds)


def _study_values(cells: Cells, study: str, metric: str) -> dict:
  """K -> per-seed values for the cells of one study (first cell per K)."""
  out = {}
  for cell in cells:
    if cell['study'] == study:
      out.setdefault(int(cell['K']), seed_values(cell, metric))
  return out


def _jsonable(obj):
  """Plain Python types, with None for every NaN or infinity."""
  if isinstance(obj, Mapping):
    return {
        (int(k) if isinstance(k, np.integer) else k): _jsonable(v)
        for k, v in obj.items()
    }
  if isinstance(obj, (list, tuple, np.ndarray)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def analyze(
    cells: Cells,
    budget: Mapping[str, Any],
    cost_per_step: Mapping[str, Mapping[int, float]],
    *,
    metric: str = 'final_eval_loss',
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
  """Every statistic of a finished sweep, ready for `json.dumps`.

  Args:
    cells: the sweep's cells (see the module docstring and DESIGN.md).
    budget: {'param_steps', 'anchor_K', 'anchor_steps'}.
    cost_per_step: axis -> {K: cost of one step on that axis}.
    metric: the per-seed value that the curves, fits and verdicts use.
    n_boot: bootstrap replicates, for paired tests, fits and the first win.
    seed: seed of every bootstrap.

  Returns:
    {'metric', 'n_seeds', 'budget', 'tables', 'axes', 'fit', 'rule',
     'crossover', 'verdicts'}. The verdicts are five separate tests at the
    95% level with no multiplicity correction.
  """
  n_seeds = count_seeds(cells, metric)
  costs = {
      a: {int(k): float(v) for k, v in c.items()}
      for a, c in cost_per_step.items()
  }
  points = collect_points(cells, metric)
  rng = np.random.default_rng([seed, 1])
  boot_idx = rng.integers(0, max(n_seeds, 1), size=(n_boot, n_seeds))
  fits = {form: fit_form(form, points, boot_idx) for form in PARAM_NAMES}
  chosen = choose_fit(fits)
  rule, context = rule_section(
      points, chosen, costs, budget, n_boot=n_boot, seed=seed
  )
  cross = crossover_section(cells, metric, boot_idx, n_boot=n_boot, seed=seed)
  matched = _study_values(cells, 'budget_matched', metric)
  anchor = (budget['anchor_K'], budget['anchor_steps'])
  boot = {'n_boot': n_boot, 'seed': seed}
  verdicts = [
      verdict_dip(matched, **boot),
      verdict_crossover(cross),
      verdict_multiplier(cells, points, budget, metric, **boot),
      verdict_k64(matched, **boot),
      verdict_rule_falls(chosen, context, n_seeds),
  ]
  fit_json = {form: _fit_report(f) for form, f in fits.items()}
  fit_json['chosen'] = chosen.form if chosen else None
  return _jsonable(
      {
          'metric': metric,
          'confidence': CONFIDENCE,
          'n_seeds': n_seeds,
          'budget': dict(budget),
          'tables': tables(cells),
          'axes': {
              a: budget_curve(points, c, *anchor) for a, c in costs.items()
          },
          'fit': fit_json if chosen else None,
          'rule': rule,
          'crossover': cross,
          'verdicts': verdicts,
      }
  )
