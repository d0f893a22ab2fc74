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
* Claim 5 (the best K falls as the budget grows) is decided from measured
  pairs of K's at equal param-steps across budgets (`budget_trend`), not
  from the fitted surface; the fit's view is reported beside it.
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
# Bound on the size of every fitted exponent; steeper power laws over K in
# [2, 64] are implausible and only absorb noise.
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
    'interaction': ('E', 'A', 'alpha', 'B', 'beta', 'gamma'),
}
FORMULAS = {
    'additive': 'E + A*K^-alpha + B*S^-beta',
    'multiplicative': 'E + A*K^-alpha*S^-beta',
    'interaction': 'E + A*K^-alpha + B*S^-beta*K^gamma',
}
EXPONENTS = ('alpha', 'beta', 'gamma')
# The interaction form has one parameter more than the additive one that it
# nests; it is chosen only when its leave-one-out RMSE is lower than the
# best two-term form's by more than this fraction.
INTERACTION_MARGIN = 0.05
# Evaluation budgets of a fit from a generic start and of a refit from a
# known optimum, per parameter (see `fit_surface`).
START_EVALS_PER_PARAM, REFIT_EVALS_PER_PARAM = 50, 25

Cells = Sequence[Mapping[str, Any]]
Points = dict[tuple[int, int], np.ndarray]


def as_float_array(values) -> np.ndarray:
  """Floats with NaN for None and for non-finite entries."""
  out = np.array(
      [np.nan if v is None else v for v in values], dtype=float
  ).reshape(-1)
  out[~np.isfinite(out)] = np.nan
  return out


def seed_values(cell: Mapping[str, Any], metric: str) -> np.ndarray:
  """One value per seed of a cell; NaN where that seed is not usable."""
  out = as_float_array(cell.get(metric) or [])
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
  x = as_float_array(values)
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
  diff = as_float_array(a) - as_float_array(b)
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
  `interaction` is E + A K^-alpha + B S^-beta K^gamma: the additive form
  whose steps term also scales with K, so that the rate at which steps pay
  off may depend on K. It is the only form whose best K at a fixed budget
  can fall as the budget grows (see `verdict_rule_falls`).
  """
  rank = np.asarray(rank, dtype=float)
  steps = np.asarray(steps, dtype=float)
  if form == 'additive':
    e, a, alpha, b, beta = params
    return e + a * rank**-alpha + b * steps**-beta
  if form == 'multiplicative':
    e, a, alpha, beta = params
    return e + a * rank**-alpha * steps**-beta
  if form == 'interaction':
    e, a, alpha, b, beta, gamma = params
    return e + a * rank**-alpha + b * steps**-beta * rank**gamma
  raise ValueError(f'form={form!r} is not one of {sorted(PARAM_NAMES)}')


def _surface_jacobian(form: str, params, rank, steps) -> np.ndarray:
  """d surface / d params, shape (n_points, n_params), for least_squares."""
  log_k, log_s = np.log(rank), np.log(steps)
  ones = np.ones_like(rank)
  if form == 'additive':
    _, a, alpha, b, beta = params
    k_term, s_term = rank**-alpha, steps**-beta
    cols = [ones, k_term, -a * k_term * log_k, s_term, -b * s_term * log_s]
  elif form == 'multiplicative':
    _, a, alpha, beta = params
    both = rank**-alpha * steps**-beta
    cols = [ones, both, -a * both * log_k, -a * both * log_s]
  else:
    _, a, alpha, b, beta, gamma = params
    k_term, s_term = rank**-alpha, steps**-beta * rank**gamma
    cols = [ones, k_term, -a * k_term * log_k, s_term]
    cols += [-b * s_term * log_s, b * s_term * log_k]
  return np.stack(cols, axis=1)


def _bounds(form: str) -> tuple[np.ndarray, np.ndarray]:
  """Lower and upper bounds of each parameter of `form`.

  Every parameter is >= 0 (losses, as cross-entropies, are >= 0 and fall
  with K and steps) and the exponents are <= `MAX_EXPONENT`, except in the
  interaction form: there alpha and gamma may be negative, so that the K
  term may rise with K and the steps term may shrink with K. Without that
  freedom the form could not express a best K that falls with the budget.
  """
  names = PARAM_NAMES[form]
  signed = ('alpha', 'gamma') if form == 'interaction' else ()
  lower = np.array([-MAX_EXPONENT if n in signed else 0.0 for n in names])
  upper = np.array([MAX_EXPONENT if n in EXPONENTS else np.inf for n in names])
  return lower, upper


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
      elif form == 'multiplicative':
        out.append([e0, spread * k0**alpha * s0**beta, alpha, beta])
      else:
        # Besides the additive start (gamma = 0), one where K's own term
        # rises with K and its steps term falls with K.
        out.append([e0, spread * k0**alpha, alpha, spread * s0**beta, beta, 0])
        out.append([e0, 0.1 * spread, -alpha, spread * s0**beta, beta, -beta])
  return [np.array(x, dtype=float) for x in out]


def fit_surface(
    rank, steps, loss, *, form: str = 'additive', x0=None
) -> np.ndarray | None:
  """Least-squares fit of `surface(form, ...)` to per-cell mean losses.

  Uses the trust-region reflective method of `scipy.optimize.least_squares`
  (Branch, Coleman & Li, 1999) with the analytic Jacobian, within
  `_bounds(form)`. Cells are weighted equally. Without `x0`, the best of a
  few starts is kept; with it (bootstrap and leave-one-out refits) only `x0`.
  Each solve stops after `START_EVALS_PER_PARAM` (from a start) or
  `REFIT_EVALS_PER_PARAM` (from `x0`, next to the optimum) evaluations per
  parameter: a solve that wanders for longer is moving along a direction
  the data do not pin down (noisy or degenerate designs), where more
  evaluations only cost time.

  Returns:
    The parameters in the order of `PARAM_NAMES[form]`, or None when there
    are not more points than parameters.
  """
  rank, steps, loss = (np.asarray(x, dtype=float) for x in (rank, steps, loss))
  names = PARAM_NAMES[form]
  if loss.size <= len(names):
    return None
  lower, upper = _bounds(form)
  starts = (
      [np.asarray(x0)] if x0 is not None else _starts(form, rank, steps, loss)
  )
  per_param = REFIT_EVALS_PER_PARAM if x0 is not None else START_EVALS_PER_PARAM
  max_nfev = per_param * len(names)
  best = None
  for start in starts:
    result = optimize.least_squares(
        lambda p: surface(form, p, rank, steps) - loss,
        np.clip(start, lower, upper),
        jac=lambda p: _surface_jacobian(form, p, rank, steps),
        bounds=(lower, upper),
        x_scale='jac',
        max_nfev=max_nfev,
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
  """The fit with the lowest leave-one-out RMSE, preferring fewer parameters.

  Among the two-term forms the lowest held-out error wins; the in-sample
  RMSE breaks ties, and decides when no held-out error could be computed.
  The interaction form replaces that winner only when its held-out RMSE is
  lower by more than `INTERACTION_MARGIN`: it nests the additive form, so on
  data without an interaction it fits the noise and is only by chance a
  little better out of sample.
  """
  inf = math.inf

  def key(fit):
    loo = fit.rmse_loo if np.isfinite(fit.rmse_loo) else inf
    return (loo, fit.rmse_in_sample)

  simple = [f for n, f in fits.items() if f is not None and n != 'interaction']
  best = min(simple, key=key) if simple else None
  rich = fits.get('interaction')
  if rich is None or not np.isfinite(rich.rmse_loo):
    return best
  if best is None or rich.rmse_loo < (1 - INTERACTION_MARGIN) * key(best)[0]:
    return rich
  return best


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
      'formula': FORMULAS[fit.form],
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


def same_budget_groups(points: Points, cost: Mapping[int, float]) -> list[dict]:
  """Budgets on one axis at which two or more K's were measured.

  Cells are grouped when their cost lies within `SAME_BUDGET_RTOL` of the
  cheapest cell of the group; a K measured twice in one group keeps its
  cheaper cell.

  Returns:
    [{'budget': geometric mean of the group's costs, 'steps': {K: steps}}],
    by ascending budget.
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
    for _, k, s in group:
      by_rank.setdefault(k, s)
    if len(by_rank) >= 2:
      budget = float(np.exp(np.mean([np.log(e[0]) for e in group])))
      out.append({'budget': budget, 'steps': dict(sorted(by_rank.items()))})
  return out


def measured_best(
    points: Points, cost: Mapping[int, float], axis: str, *, n_boot, seed
) -> list[dict]:
  """Budgets where >= 2 K's were measured at (nearly) the same cost.

  For each of `same_budget_groups`, the lowest mean loss names the measured
  best K, and it is compared, paired, with the runner-up.
  """
  out = []
  for group in same_budget_groups(points, cost):
    losses = [
        {'K': k, 'steps': s, 'mean': float(np.nanmean(points[(k, s)]))}
        for k, s in group['steps'].items()
    ]
    first, second = sorted(losses, key=lambda r: r['mean'])[:2]
    out.append(
        {
            'axis': axis,
            'budget': group['budget'],
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


def _trend_series(points, cost, anchor, *, n_boot, seed) -> list[dict]:
  """Per pair of K's measured together at >= 2 budgets, its paired points."""
  series = {}
  for group in same_budget_groups(points, cost):
    ranks = list(group['steps'])
    for i, small in enumerate(ranks):
      for large in ranks[i + 1 :]:
        values_small = points[(small, group['steps'][small])]
        values_large = points[(large, group['steps'][large])]
        series.setdefault((small, large), []).append(
            {
                'budget': group['budget'],
                'x_anchor': group['budget'] / anchor if anchor else None,
                'steps_small': group['steps'][small],
                'steps_large': group['steps'][large],
                'advantage': paired(
                    values_small, values_large, n_boot=n_boot, seed=seed
                ),
                'values': values_small - values_large,
            }
        )
  return [
      {'K_small': small, 'K_large': large, 'points': rows}
      for (small, large), rows in sorted(series.items())
      if len(rows) >= 2
  ]


def _seed_slopes(series: list[dict]) -> np.ndarray:
  """Each seed's OLS slope of advantage on log2(budget), one per K pair.

  The pairs share the slope and keep their own intercepts (each pair is
  centred on its own means), so a pair whose advantage is large throughout
  does not tilt the slope. Observations a seed lacks are left out; a seed
  with no pair measured at two budgets gets NaN.
  """
  n_seeds = series[0]['points'][0]['values'].size
  num, den = np.zeros(n_seeds), np.zeros(n_seeds)
  for entry in series:
    x = np.log2([p['budget'] for p in entry['points']])
    y = np.stack([p['values'] for p in entry['points']])  # (n_budgets, S)
    finite = np.isfinite(y)
    count = finite.sum(axis=0)
    x_all = np.broadcast_to(x[:, None], y.shape)
    with np.errstate(invalid='ignore', divide='ignore'):
      x_mean = np.where(finite, x_all, 0).sum(0) / np.maximum(count, 1)
      y_mean = np.where(finite, y, 0).sum(0) / np.maximum(count, 1)
    xc = np.where(finite, x_all - x_mean, 0.0)
    yc = np.where(finite, y - y_mean, 0.0)
    use = count >= 2
    num += np.where(use, (xc * yc).sum(0), 0.0)
    den += np.where(use, (xc * xc).sum(0), 0.0)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _first_flip(series: list[dict], sign: int) -> dict | None:
  """The first pair whose mean advantage has sign `sign`, then -`sign`.

  sign=+1 finds the larger K winning at a budget and losing at a larger
  one (the best K falls); sign=-1 the reverse.
  """
  for entry in series:
    means = [p['advantage']['mean_diff'] for p in entry['points']]
    for i, before in enumerate(means):
      if not sign * before > 0:
        continue
      for j in range(i + 1, len(means)):
        if sign * means[j] < 0:
          return {
              'K_small': entry['K_small'],
              'K_large': entry['K_large'],
              'from_budget': entry['points'][i]['budget'],
              'to_budget': entry['points'][j]['budget'],
          }
  return None


def budget_trend(
    points: Points,
    cost: Mapping[int, float],
    anchor: float | None,
    *,
    axis: str = 'param_steps',
    n_boot: int = 2000,
    seed: int = 0,
) -> dict | None:
  """How the larger K's measured advantage changes as the budget grows.

  Model-free: it uses only pairs of K's measured at the same budget on
  `axis` (`same_budget_groups`), such as the crossover study's K=32 at s
  steps against K=2 at 16 s. A pair's advantage at a budget is the paired
  difference L(smaller K) - L(larger K): positive where the larger K wins.
  Each seed's slope of that advantage against log2(budget) comes from
  `_seed_slopes`. Their mean gets a Student t interval over seeds and a
  two-sided one-sample t test against 0 (`paired` against zeros), and
  `prob_negative` is the share of bootstrap resamples of the seeds whose
  mean slope is below zero. A negative slope means the smaller K gains as
  the budget grows. `flips` names where the sign of a pair's mean advantage
  actually changes with the budget.

  Returns:
    {'axis', 'anchor', 'series', 'slope', 'seed_slopes', 'flips'}, or None
    when no pair of K's was measured together at two or more budgets.
  """
  series = _trend_series(points, cost, anchor, n_boot=n_boot, seed=seed)
  if not series:
    return None
  slopes = _seed_slopes(series)
  test = paired(slopes, np.zeros_like(slopes), n_boot=n_boot, seed=seed)
  slope = {
      'mean': test['mean_diff'] if test['n'] >= 2 else mean_ci(slopes)['mean'],
      'ci95': test['ci95'],
      'n': test['n'],
      'p': test['p'],
      'prob_negative': test['prob_a_lower'],
      'unit': 'per doubling of the budget',
  }
  for entry in series:
    for row in entry['points']:
      del row['values']
  return {
      'axis': axis,
      'anchor': anchor,
      'series': series,
      'slope': slope,
      'seed_slopes': slopes,
      'flips': {
          'falls': _first_flip(series, 1),
          'rises': _first_flip(series, -1),
      },
  }


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
  """(s, K=32 values, K=2 values, K=2 steps, param-steps) per full pair s."""
  by_pair = {}
  for cell in cells:
    if cell['study'] == 'crossover' and 'pair' in cell:
      by_pair.setdefault(int(cell['pair']), {})[int(cell['K'])] = cell
  out = []
  for s, by_rank in sorted(by_pair.items()):
    if CROSS_HIGH_RANK in by_rank and CROSS_LOW_RANK in by_rank:
      high, low = by_rank[CROSS_HIGH_RANK], by_rank[CROSS_LOW_RANK]
      out.append(
          (
              s,
              seed_values(high, metric),
              seed_values(low, metric),
              int(low['steps']),
              high.get('param_steps'),
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
  for s, high, low, low_steps, param_steps in pairs:
    cmp = paired(high, low, n_boot=n_boot, seed=seed)
    high_ci, low_ci = mean_ci(high), mean_ci(low)
    rows.append(
        {
            'pair': s,
            'steps_K32': s,
            'steps_K2': low_steps,
            'param_steps': param_steps,
            'mean_K32': high_ci['mean'],
            'ci95_K32': high_ci['ci95'],
            'mean_K2': low_ci['mean'],
            'ci95_K2': low_ci['ci95'],
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


def multipliers_section(cells, points, budget, metric, *, n_boot, seed):
  """The budget-multiplier cells against the anchor cell, paired.

  Returns:
    One row per budget_multipliers cell, by multiplier: {'K', 'multiplier',
    'steps', 'loss': mean_ci, 'vs_anchor': paired(cell, anchor)} where the
    anchor is K=anchor_K at anchor_steps; None when the study is absent.
  """
  chosen = [c for c in cells if c['study'] == 'budget_multipliers']
  if not chosen:
    return None
  anchor = points.get((budget['anchor_K'], budget['anchor_steps']))
  rows = []
  for cell in sorted(chosen, key=lambda c: float(c.get('multiplier', 0))):
    values = seed_values(cell, metric)
    vs_anchor = paired(
        values,
        anchor if anchor is not None else np.full(values.size, np.nan),
        n_boot=n_boot,
        seed=seed,
    )
    rows.append(
        {
            'K': int(cell['K']),
            'multiplier': cell.get('multiplier'),
            'steps': int(cell['steps']),
            'loss': mean_ci(values),
            'vs_anchor': vs_anchor,
        }
    )
  return rows


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


def fit_rule_view(fit: SurfaceFit | None, context: _RuleContext) -> dict:
  """What the chosen fit says about claim 5 (param_steps axis).

  The best K at the smallest and the largest grid budget, and, over the
  bootstrap refits, the share whose best-K sequence over the grid "falls"
  (never rises and ends lower) or "rises" (never falls and ends higher).

  NOTE: the additive and multiplicative forms cannot make the best K fall on
  any axis whose cost per step grows with K: in the additive form the
  budget only scales the steps term, whose weight grows with K, so the
  optimum moves up (as budget^(beta / (alpha + beta)) when cost is linear
  in K); in the multiplicative form the budget is a common factor, so the
  best K is the same at every budget. The interaction form can (with cost
  linear in K, only when alpha < 0 and gamma < -beta), which is why this
  view is supporting evidence and the verdict rests on measured pairs.
  """
  if fit is None or context.grid is None:
    return {
        'form': None,
        'text': 'no fit (too few cells, or K * steps'
        ' constant in all of them)',
    }
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
  text = (
      f'{fit.form} fit: best K={point[0]} at {grid[0]:.3g} -> K={point[-1]}'
      f' at {grid[-1]:.3g} param-steps; bootstrap P(falls)={p_falls:.2f},'
      f' P(rises)={p_rises:.2f} over {len(falls)} refits'
  )
  return {
      'form': fit.form,
      'best_K_low': int(point[0]),
      'best_K_high': int(point[-1]),
      'prob_falls': p_falls,
      'prob_rises': p_rises,
      'text': text,
  }


def _trend_text(trend: Mapping[str, Any]) -> str:
  """The slope, and the longest pair's advantage at its end budgets."""
  slope = trend['slope']
  lo, hi = slope['ci95']
  text = (
      f'slope of L(small K)-L(large K) per doubling of param-steps'
      f' {slope["mean"]:+.4f} [{lo:+.4f}, {hi:+.4f}], p={slope["p"]:.2g},'
      f' P(slope<0)={slope["prob_negative"]:.2f}, n={slope["n"]}'
  )
  longest = max(trend['series'], key=lambda e: len(e['points']))
  first, last = longest['points'][0], longest['points'][-1]

  def at(row):
    adv = row['advantage']
    where = (
        f'{row["x_anchor"]:.3g}x' if row['x_anchor'] else f'{row["budget"]:.3g}'
    )
    lo, hi = adv['ci95']
    return f'{adv["mean_diff"]:+.4f} [{lo:+.4f}, {hi:+.4f}] at {where}'

  text += (
      f'; K={longest["K_small"]} vs K={longest["K_large"]} at'
      f' {len(longest["points"])} budgets: {at(first)} -> {at(last)}'
  )
  flip = trend['flips']['falls']
  if flip:
    text += (
        f'; larger K wins then loses (K={flip["K_small"]} vs'
        f' K={flip["K_large"]}, {flip["from_budget"]:.3g} ->'
        f' {flip["to_budget"]:.3g})'
    )
  else:
    text += (
        '; no pair goes from the larger K winning to the smaller K winning'
        ' in the measured range'
    )
  return text


def verdict_rule_falls(
    trend: Mapping[str, Any] | None, fit_view: Mapping[str, Any]
) -> dict:
  """Claim 5: the optimal K falls as the budget grows (param_steps axis).

  Decided from measured pairs alone (`budget_trend`): confirmed when the
  larger K's paired advantage has a slope against log budget whose 95%
  interval lies below zero AND some pair's mean advantage actually turns
  from the larger K to the smaller K within the measured budgets; refuted
  when the slope's interval lies above zero (the larger K gains as the
  budget grows); otherwise inconclusive. The fitted surface's view
  (`fit_rule_view`) is appended to the statistic as supporting evidence;
  it does not decide.
  """
  claim = 'The optimal K falls as the budget grows (param_steps axis)'
  support = f'fit view: {fit_view["text"]}'
  if trend is None or trend['slope']['n'] < 2:
    n = trend['slope']['n'] if trend else 0
    return _verdict(
        claim,
        INCONCLUSIVE,
        "not run: no two K's measured at equal param-steps at two or more"
        f' budgets with two usable seeds; {support}',
        n,
    )
  lo, hi = trend['slope']['ci95']
  if hi < 0 and trend['flips']['falls']:
    verdict = CONFIRMED
  elif lo > 0:
    verdict = REFUTED
  else:
    verdict = INCONCLUSIVE
  text = f'{_trend_text(trend)}; {support}'
  return _verdict(claim, verdict, text, trend['slope']['n'])


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


def _param_steps_trend(points, costs, budget, *, n_boot, seed):
  """`budget_trend` on the param_steps axis, or None without that axis."""
  per_step = costs.get('param_steps')
  if not per_step:
    return None
  anchor = None
  if budget['anchor_K'] in per_step:
    anchor = per_step[budget['anchor_K']] * budget['anchor_steps']
  return budget_trend(points, per_step, anchor, n_boot=n_boot, seed=seed)


def cost_per_step_of(results: Mapping[str, Any]) -> dict:
  """The cost_per_step that `analyze` takes, from a results.json.

  The one the analysis saved, when there is one. Otherwise trainable params
  per K come from the cells, FLOPs per step from `timing.flops_per_step`,
  and seconds per step from the calibrated timing, or the measured one when
  no calibration ran, as the sweep does. Lets a notebook rerun `analyze` on
  a saved sweep.
  """
  saved = results.get('cost_per_step') or (results.get('analysis') or {}).get(
      'cost_per_step'
  )
  if saved:
    return {
        axis: {int(k): float(v) for k, v in cost.items()}
        for axis, cost in saved.items()
    }
  timing = results.get('timing') or {}
  costs = {
      'param_steps': {
          int(c['K']): c['trainable_params']
          for c in results.get('cells', [])
          if 'trainable_params' in c
      }
  }
  if timing.get('flops_per_step'):
    costs['flops'] = timing['flops_per_step']
  seconds = timing.get('seconds_per_step_calibrated') or timing.get(
      'seconds_per_step_measured'
  )
  if seconds:
    costs['wall_s'] = seconds
  return {
      axis: {int(k): float(v) for k, v in cost.items()}
      for axis, cost in costs.items()
  }


def analyze(
    cells: Cells,
    budget: Mapping[str, Any],
    cost_per_step: Mapping[str, Mapping[int, float]],
    *,
    metric: str = 'final_eval_loss',
    n_boot: int = 2000,
    n_boot_fit: int = 500,
    seed: int = 0,
) -> dict:
  """Every statistic of a finished sweep, ready for `json.dumps`.

  Args:
    cells: the sweep's cells (see the module docstring and DESIGN.md).
    budget: {'param_steps', 'anchor_K', 'anchor_steps'}.
    cost_per_step: axis -> {K: cost of one step on that axis}.
    metric: the per-seed value that the curves, fits and verdicts use.
    n_boot: bootstrap replicates, for paired tests, the trend of claim 5
      and the first win.
    n_boot_fit: surface refits on seed resamples, per form: the first
      min(n_boot, n_boot_fit) of the same resamples. Each refit is a
      least-squares solve (milliseconds, where a paired replicate costs
      microseconds); 500 pin a 95% percentile interval down well enough.
    seed: seed of every bootstrap.

  Returns:
    {'metric', 'confidence', 'n_seeds', 'budget', 'cost_per_step',
     'tables', 'axes', 'fit', 'rule', 'crossover', 'multipliers',
     'budget_trend', 'verdicts'}. The verdicts are five separate tests at the
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
  fit_idx = boot_idx[: max(0, min(n_boot, n_boot_fit))]
  fits = {form: fit_form(form, points, fit_idx) for form in PARAM_NAMES}
  chosen = choose_fit(fits)
  boot = {'n_boot': n_boot, 'seed': seed}
  rule, context = rule_section(points, chosen, costs, budget, **boot)
  rule['fit_view'] = fit_rule_view(chosen, context)
  cross = crossover_section(cells, metric, boot_idx, **boot)
  matched = _study_values(cells, 'budget_matched', metric)
  anchor = (budget['anchor_K'], budget['anchor_steps'])
  trend = _param_steps_trend(points, costs, budget, **boot)
  verdicts = [
      verdict_dip(matched, **boot),
      verdict_crossover(cross),
      verdict_multiplier(cells, points, budget, metric, **boot),
      verdict_k64(matched, **boot),
      verdict_rule_falls(trend, rule['fit_view']),
  ]
  fit_json = {form: _fit_report(f) for form, f in fits.items()}
  fit_json['chosen'] = chosen.form if chosen else None
  return _jsonable(
      {
          'metric': metric,
          'confidence': CONFIDENCE,
          'n_seeds': n_seeds,
          'budget': dict(budget),
          'cost_per_step': {
              a: {str(k): v for k, v in c.items()} for a, c in costs.items()
          },
          'tables': tables(cells),
          'axes': {
              a: budget_curve(points, c, *anchor) for a, c in costs.items()
          },
          'fit': fit_json if chosen else None,
          'rule': rule,
          'crossover': cross,
          'multipliers': multipliers_section(
              cells, points, budget, metric, **boot
          ),
          'budget_trend': trend,
          'verdicts': verdicts,
      }
  )
