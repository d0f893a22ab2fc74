"""Tests of ctsft_jax.analysis on synthetic sweeps with planted effects.

Each synthetic sweep has the cells of the default study, with losses drawn
from a known surface plus seeded noise: a per-seed offset shared by every
cell (the paired part) and independent noise per cell and seed.
"""

import json
import math

import numpy as np
import pytest
from scipy import stats

from ctsft_jax import analysis
from ctsft_jax import errors

# Trainable params per unit of K (the paper's 96,062 at K=2).
PARAMS_PER_RANK = 48_031
MATCHED_STEPS = {2: 640, 4: 320, 8: 160, 16: 80, 32: 40, 64: 20}
MULTIPLIER_STEPS = {1: 640, 2: 1280, 4: 2560, 8: 5120}
CROSS_STEPS = (5, 10, 20, 40, 80)
BUDGET = {
    'param_steps': PARAMS_PER_RANK * 32 * 40,
    'anchor_K': 32,
    'anchor_steps': 40,
}
COST = {
    'param_steps': {k: PARAMS_PER_RANK * k for k in MATCHED_STEPS},
    # The frozen base dominates: FLOPs and seconds barely grow with K.
    'flops': {k: 1e12 + 1e9 * k for k in MATCHED_STEPS},
    'wall_s': {k: 0.05 + 1e-4 * k for k in MATCHED_STEPS},
}
PLANTED = {'E': 2.0, 'A': 1.5, 'alpha': 0.7, 'B': 4.0, 'beta': 0.5}
ALL_STUDIES = ('budget_matched', 'budget_multipliers', 'crossover')


def design(studies=ALL_STUDIES):
  """(study, K, steps, extra keys) of every cell of the default sweep."""
  out = []
  if 'budget_matched' in studies:
    out += [('budget_matched', k, s, {}) for k, s in MATCHED_STEPS.items()]
  if 'budget_multipliers' in studies:
    out += [
        ('budget_multipliers', 2, s, {'multiplier': float(m)})
        for m, s in MULTIPLIER_STEPS.items()
    ]
  if 'crossover' in studies:
    for s in CROSS_STEPS:
      out.append(('crossover', 32, s, {'pair': s}))
      out.append(('crossover', 2, 16 * s, {'pair': s}))
  return out


def make_cells(
    true_loss,
    *,
    n_seeds=8,
    noise=0.005,
    shared=0.02,
    seed=0,
    studies=ALL_STUDIES,
):
  """Cells whose seed i has loss true_loss(K, steps) + offset_i + noise."""
  rng = np.random.default_rng(seed)
  offsets = rng.normal(0.0, shared, n_seeds)
  cells = []
  for study, rank, steps, extra in design(studies):
    losses = true_loss(rank, steps) + offsets + rng.normal(0, noise, n_seeds)
    cell = {
        'study': study,
        'K': rank,
        'steps': steps,
        'trainable_params': PARAMS_PER_RANK * rank,
        'param_steps': PARAMS_PER_RANK * rank * steps,
        'flops': COST['flops'][rank] * steps,
        'wall_s': COST['wall_s'][rank] * steps,
        'final_eval_loss': [float(x) for x in losses],
        'final_train_loss': [float(x) - 0.1 for x in losses],
        'status': ['ok'] * n_seeds,
    }
    cell.update(extra)
    cells.append(cell)
  return cells


def additive(rank, steps, p=PLANTED):
  return p['E'] + p['A'] * rank ** -p['alpha'] + p['B'] * steps ** -p['beta']


def dip_surface(plant):
  """Falls with K at budget parity; +0.1 at K=16 when planted."""
  return (
      lambda k, s: 8.6
      + 0.4 * (2 / k) ** 0.5
      + (0.1 if plant and k == 16 else 0.0)
  )


def crossover_surface(first_win):
  """K=32 at s is 0.05 above K=2 at 16 s below `first_win`, 0.05 below."""

  def loss(rank, steps):
    if rank == 32:
      return (
          8 + 20 / (16 * steps) ** 0.5 + (0.05 if steps < first_win else -0.05)
      )
    return 8 + 20 / steps**0.5 + 0.01 * rank

  return loss


def run(cells, **kwargs):
  kwargs.setdefault('n_boot', 100)
  # Surface refits cost milliseconds each; tests of the fit ask for more.
  kwargs.setdefault('n_boot_fit', 10)
  return analysis.analyze(cells, BUDGET, COST, **kwargs)


def verdict(result, number):
  return result['verdicts'][number - 1]


def test_mean_ci_matches_hand_formula():
  x = np.array([1.0, 2.5, 2.0, 4.0, 3.1])
  half = stats.t.ppf(0.975, 4) * x.std(ddof=1) / math.sqrt(5)
  got = analysis.mean_ci(list(x) + [None, float('nan')])
  assert got['n'] == 5
  np.testing.assert_allclose(got['mean'], x.mean())
  np.testing.assert_allclose(got['ci95'], [x.mean() - half, x.mean() + half])
  interval = stats.t.interval(0.95, 4, loc=x.mean(), scale=stats.sem(x))
  np.testing.assert_allclose(got['ci95'], interval)


def test_mean_ci_needs_two_values():
  got = analysis.mean_ci([3.0, None])
  assert got['mean'] == 3.0 and all(math.isnan(v) for v in got['ci95'])


def test_paired_matches_ttest_rel_and_drops_unpaired_seeds():
  rng = np.random.default_rng(1)
  a, b = rng.normal(0, 1, 9), rng.normal(0.5, 1, 9)
  a_gaps, b_gaps = list(a) + [None, 1.0], list(b) + [2.0, None]
  got = analysis.paired(a_gaps, b_gaps, n_boot=500)
  assert got['n'] == 9
  np.testing.assert_allclose(got['mean_diff'], np.mean(a - b))
  np.testing.assert_allclose(got['p'], stats.ttest_rel(a, b).pvalue)
  assert 0 <= got['prob_a_lower'] <= 1


def test_paired_bootstrap_probability_follows_the_sign():
  lower = analysis.paired([1.0, 2.0, 3.0], [1.5, 2.6, 3.4])
  assert lower['prob_a_lower'] == 1.0
  assert analysis.paired([2, 3, 4], [1, 2, 3.5])['prob_a_lower'] == 0.0


def test_paired_with_one_pair_is_nan():
  got = analysis.paired([1.0, None], [2.0, 3.0])
  assert got['n'] == 1 and math.isnan(got['p']) and math.isnan(got['mean_diff'])


def test_planted_dip_is_confirmed_and_k64_best():
  result = run(make_cells(dip_surface(plant=True)))
  assert verdict(result, 1)['verdict'] == analysis.CONFIRMED
  assert verdict(result, 1)['n_seeds'] == 8
  assert verdict(result, 3)['verdict'] == analysis.REFUTED


def test_monotone_curve_refutes_dip_and_confirms_k64():
  result = run(make_cells(dip_surface(plant=False)))
  assert verdict(result, 1)['verdict'] == analysis.REFUTED
  assert verdict(result, 4)['verdict'] == analysis.CONFIRMED


def test_huge_noise_is_inconclusive():
  result = run(
      make_cells(dip_surface(plant=True), noise=2.0, seed=3), n_boot=50
  )
  for number in (1, 2, 3, 4):
    assert verdict(result, number)['verdict'] == analysis.INCONCLUSIVE


def test_planted_crossover_at_20_is_confirmed():
  result = run(make_cells(crossover_surface(first_win=20)))
  assert result['crossover']['first_win_steps'] == 20
  assert verdict(result, 2)['verdict'] == analysis.CONFIRMED
  boot = result['crossover']['first_win_bootstrap']
  assert boot['ci95'] == [20, 20] and boot['prob']['20'] == 1.0
  assert verdict(result, 3)['verdict'] == analysis.CONFIRMED
  # Off K=32 this surface favours few K: K=2 beats K=64 at parity.
  assert verdict(result, 4)['verdict'] == analysis.REFUTED
  assert 'significantly better than K=64' in verdict(result, 4)['statistic']


def test_crossover_at_40_refutes_the_claim():
  result = run(make_cells(crossover_surface(first_win=40)))
  assert result['crossover']['first_win_steps'] == 40
  assert verdict(result, 2)['verdict'] == analysis.REFUTED


def test_no_crossover_win_reports_never():
  result = run(make_cells(crossover_surface(first_win=1000)))
  assert result['crossover']['first_win_steps'] is None
  boot = result['crossover']['first_win_bootstrap']
  assert boot['prob_never'] == 1.0 and boot['ci95'] == [None, None]


def test_fit_recovers_planted_additive_surface():
  cells = make_cells(additive, noise=1e-4, shared=0.0)
  fit = run(cells, n_boot=30, n_boot_fit=30)['fit']
  assert fit['chosen'] == 'additive'
  params = fit['additive']['params']
  for name, value in PLANTED.items():
    # Noise of 1e-4 on losses near 3 leaves every parameter within 2%.
    assert params[name]['value'] == pytest.approx(value, rel=0.02), name
    lo, hi = params[name]['ci95']
    assert lo <= params[name]['value'] <= hi
  assert fit['additive']['rmse_loo'] < 1e-3
  assert fit['multiplicative']['rmse_loo'] > 10 * fit['additive']['rmse_loo']


def test_fit_prefers_multiplicative_on_multiplicative_data():
  surface = lambda k, s: 2.0 + 30.0 * k**-0.4 * s**-0.6
  fit = run(make_cells(surface, noise=1e-4, shared=0.0), n_boot=10)['fit']
  assert fit['chosen'] == 'multiplicative'
  assert fit['multiplicative']['params']['alpha']['value'] == pytest.approx(
      0.4, rel=0.02
  )


def analytic_crossover(k1, k2, p=PLANTED):
  """Budget where the additive surface's K1 and K2 tie at equal param-steps.

  A K1^-a + B (b / (c K1))^-b' = A K2^-a + B (b / (c K2))^-b', solved for b.
  """
  a, beta = p['alpha'], p['beta']
  ratio = p['B'] * (k2**beta - k1**beta) / (p['A'] * (k1**-a - k2**-a))
  return PARAMS_PER_RANK * ratio ** (1 / beta)


def test_rule_crossovers_match_analytic_budgets():
  budgets = np.geomspace(1e6, 1e9, 200)
  step = budgets[1] / budgets[0]
  rule = analysis.derive_rule(
      lambda k, s: additive(k, s), [2, 8, 32], COST['param_steps'], budgets
  )
  assert [r['best_K'] for r in rule['ranges']] == [2, 8, 32]
  pairs = [(c['from_K'], c['to_K']) for c in rule['crossovers']]
  assert pairs == [(2, 8), (8, 32)]
  for crossover in rule['crossovers']:
    exact = analytic_crossover(crossover['from_K'], crossover['to_K'])
    assert abs(math.log(crossover['budget'] / exact)) <= math.log(step)
  assert rule['ranges'][0]['budget_min'] == budgets[0]
  assert rule['ranges'][1]['budget_min'] == rule['crossovers'][0]['budget']


def test_fitted_rule_rises_and_refutes_claim_5():
  result = run(
      make_cells(additive, noise=1e-4, shared=0.0), n_boot=30, n_boot_fit=30
  )
  ranges = [r for r in result['rule']['ranges'] if r['axis'] == 'param_steps']
  best = [r['best_K'] for r in ranges]
  assert best == sorted(best) and best[0] < best[-1]
  for crossover in result['rule']['crossovers']:
    if crossover['axis'] == 'param_steps':
      exact = analytic_crossover(crossover['from_K'], crossover['to_K'])
      # A grid step is about 4.7%; the fit adds a little.
      assert abs(math.log(crossover['budget'] / exact)) < 0.1
  assert verdict(result, 5)['verdict'] == analysis.REFUTED
  assert verdict(result, 5)['n_seeds'] == 8
  # Supporting view: every refit of the additive fit has a rising best K.
  assert result['rule']['fit_view']['prob_rises'] == 1.0
  assert 'fit view: additive fit' in verdict(result, 5)['statistic']


def falling_surface(rank, steps, shift32=0.0):
  """Larger K wins early and loses late: the best K falls with the budget.

  At budget C = K * S (per unit of params) the loss is
  2 + 0.05 K^0.3 + 4 C^-0.5 K^-0.3, whose best K is 1490 C^(-5/6): about
  22 at C = 160 (K=32 x 5 steps) and 2 at C = 2,560 (K=32 x 80 steps).
  """
  shift = shift32 if rank == 32 else 0.0
  return 2.0 + 0.05 * rank**0.3 + 4.0 * steps**-0.5 * rank**-0.8 + shift


def crossover_advantage_slope(true_loss):
  """OLS slope of L(K=2, 16 s) - L(K=32, s) on log2(32 s), independently."""
  x = np.log2([32 * s for s in CROSS_STEPS])
  y = [true_loss(2, 16 * s) - true_loss(32, s) for s in CROSS_STEPS]
  return np.polyfit(x, y, 1)[0]


def test_planted_falling_optimum_confirms_claim_5():
  result = run(make_cells(falling_surface))
  got = verdict(result, 5)
  assert got['verdict'] == analysis.CONFIRMED, got['statistic']
  trend = result['budget_trend']
  # Only K=2 and K=32 share a budget at more than one budget.
  assert [(e['K_small'], e['K_large']) for e in trend['series']] == [(2, 32)]
  assert [p['x_anchor'] for p in trend['series'][0]['points']] == (
      pytest.approx([0.125, 0.25, 0.5, 1.0, 2.0])
  )
  expected = crossover_advantage_slope(falling_surface)
  assert expected < 0
  # Independent noise of 0.005 per cell leaves the slope within 0.004.
  assert trend['slope']['mean'] == pytest.approx(expected, abs=0.004)
  assert trend['slope']['ci95'][1] < 0
  assert trend['flips']['falls']['K_large'] == 32
  assert trend['flips']['rises'] is None
  assert got['n_seeds'] == 8


def test_negative_slope_without_a_flip_is_inconclusive():
  # K=32 carries a penalty large enough that K=2 wins at every budget.
  surface = lambda k, s: falling_surface(k, s, shift32=0.2)
  result = run(make_cells(surface))
  trend = result['budget_trend']
  assert trend['slope']['ci95'][1] < 0 and trend['flips']['falls'] is None
  assert verdict(result, 5)['verdict'] == analysis.INCONCLUSIVE
  assert 'no pair goes from the larger K winning' in (
      verdict(result, 5)['statistic']
  )


def test_interaction_fit_is_chosen_and_its_rule_falls():
  cells = make_cells(falling_surface, noise=1e-4, shared=0.0)
  result = run(cells, n_boot=20, n_boot_fit=20)
  fit = result['fit']
  assert fit['chosen'] == 'interaction'
  params = fit['interaction']['params']
  for name, value in {'alpha': -0.3, 'beta': 0.5, 'gamma': -0.8}.items():
    assert params[name]['value'] == pytest.approx(value, abs=0.02), name
  assert fit['interaction']['rmse_loo'] < 0.5 * fit['additive']['rmse_loo']
  ranges = [r for r in result['rule']['ranges'] if r['axis'] == 'param_steps']
  best = [r['best_K'] for r in ranges]
  assert best == sorted(best, reverse=True) and best[0] > best[-1]
  assert result['rule']['fit_view']['prob_falls'] == 1.0


def test_budget_trend_pools_pairs_with_their_own_intercepts():
  rng = np.random.default_rng(5)
  n_seeds = 4
  cost = {2: 1.0, 4: 2.0, 8: 4.0, 32: 16.0}
  design = {(2, 32): (64, 128, 256), (4, 8): (96, 512)}
  points = {}
  for ranks, budgets in design.items():
    for budget in budgets:
      for k in ranks:
        points[(k, budget // int(cost[k]))] = rng.normal(3, 0.3, n_seeds)
  points[(8, 128)][1] = np.nan  # seed 1 keeps one (4, 8) budget only
  trend = analysis.budget_trend(points, cost, 128.0, n_boot=0)
  assert [(e['K_small'], e['K_large']) for e in trend['series']] == list(design)
  for seed in range(n_seeds):
    # Least squares of advantage on log2(budget) plus one dummy per pair.
    rows, y = [], []
    for i, ((small, large), budgets) in enumerate(design.items()):
      for b in budgets:
        diff = (
            points[(small, b // int(cost[small]))][seed]
            - points[(large, b // int(cost[large]))][seed]
        )
        if np.isfinite(diff):
          rows.append([math.log2(b), float(i == 0), float(i == 1)])
          y.append(diff)
    # Seed 1's lone (4, 8) point is fit exactly by its dummy.
    expected = np.linalg.lstsq(rows, y, rcond=None)[0][0]
    assert trend['seed_slopes'][seed] == pytest.approx(expected), seed
  assert trend['series'][0]['points'][1]['x_anchor'] == pytest.approx(1.0)
  assert trend['slope']['n'] == n_seeds
  assert math.isnan(trend['slope']['prob_negative'])


def test_measured_best_groups_equal_cost_cells():
  result = run(make_cells(dip_surface(plant=False)))
  measured = [
      m for m in result['rule']['measured'] if m['axis'] == 'param_steps'
  ]
  anchor = [
      m for m in measured if m['budget'] == pytest.approx(BUDGET['param_steps'])
  ]
  assert len(anchor) == 1
  assert sorted(r['K'] for r in anchor[0]['losses']) == sorted(MATCHED_STEPS)
  assert anchor[0]['best_K'] == 64
  paper = result['rule']['paper_rule']['ranges']
  assert [r['best_K'] for r in paper] == [8, 32, 64, 2]
  assert paper[0]['x_max'] == pytest.approx(0.488, abs=1e-3)
  assert paper[-1]['x_max'] is None


def test_axes_interpolate_in_log_steps():
  cells = make_cells(dip_surface(plant=False), n_seeds=3)
  # On this axis the anchor budget buys K=2 exactly 905 steps.
  cost = {
      'made_up': {32: 905.0 / 40, 2: 1.0, 64: 1e-3},
      'no_anchor': {2: 1.0},
  }
  result = analysis.analyze(cells, BUDGET, cost, n_boot=10)
  rows = {r['K']: r for r in result['axes']['made_up']['points']}
  assert rows[32]['available'] and not rows[32]['interpolated']
  k2 = rows[2]
  assert k2['interpolated'] and k2['bracket_steps'] == [640, 1280]
  by_steps = {
      c['steps']: np.array(c['final_eval_loss'])
      for c in cells
      if c['K'] == 2 and c['study'] == 'budget_matched'
  }
  by_steps[1280] = next(
      np.array(c['final_eval_loss'])
      for c in cells
      if c['K'] == 2 and c['steps'] == 1280
  )
  w = math.log(905 / 640) / math.log(2)
  expected = (1 - w) * by_steps[640] + w * by_steps[1280]
  assert k2['mean'] == pytest.approx(expected.mean())
  assert not rows[64]['available'] and rows[64]['mean'] is None
  assert result['axes']['no_anchor'] is None


def test_diverged_seeds_are_dropped_and_counted():
  cells = make_cells(dip_surface(plant=True))
  k16 = next(
      c for c in cells if c['study'] == 'budget_matched' and c['K'] == 16
  )
  k16['final_eval_loss'][0] = None
  k16['status'][0] = 'diverged'
  k16['status'][1] = 'diverged'  # A value is present but not trusted.
  result = run(cells)
  row = next(r for r in result['tables']['budget_matched'] if r['K'] == 16)
  assert (row['n_ok'], row['n_diverged']) == (6, 2)
  assert row['final_eval_loss']['n'] == 6
  kept = k16['final_eval_loss'][2:]
  assert row['final_eval_loss']['mean'] == pytest.approx(np.mean(kept))
  assert verdict(result, 1)['n_seeds'] == 6


def test_all_diverged_cell_is_inconclusive_and_json_safe():
  cells = make_cells(dip_surface(plant=True))
  for cell in cells:
    if cell['K'] == 16:
      cell['final_eval_loss'] = [None] * 8
      cell['status'] = ['diverged'] * 8
  result = run(cells)
  assert verdict(result, 1)['verdict'] == analysis.INCONCLUSIVE
  assert verdict(result, 1)['n_seeds'] == 0
  json.dumps(result, allow_nan=False)


def test_missing_studies_and_two_seeds():
  cells = make_cells(
      dip_surface(plant=True), n_seeds=2, studies=('budget_matched',)
  )
  result = run(cells)
  assert result['n_seeds'] == 2
  assert result['crossover'] is None
  # K * steps is the same in every budget-matched cell: no surface to fit.
  assert result['fit'] is None and result['rule']['ranges'] == []
  assert verdict(result, 5)['verdict'] == analysis.INCONCLUSIVE
  assert verdict(result, 2)['statistic'] == 'not run'
  assert verdict(result, 3)['statistic'] == 'not run'
  assert set(result['tables']) == {'budget_matched'}
  assert [v['verdict'] for v in result['verdicts']][1:3] == [
      analysis.INCONCLUSIVE
  ] * 2
  json.dumps(result, allow_nan=False)


def test_empty_sweep_does_not_crash():
  result = run([])
  assert result['fit'] is None and result['crossover'] is None
  assert {v['verdict'] for v in result['verdicts']} == {analysis.INCONCLUSIVE}
  json.dumps(result, allow_nan=False)


def test_full_output_is_strict_json():
  result = run(make_cells(crossover_surface(first_win=20)), n_boot=50)
  text = json.dumps(result, allow_nan=False)
  assert json.loads(text)['verdicts'][1]['claim'].startswith('K=32')


def test_unequal_seed_counts_are_a_user_error():
  cells = make_cells(dip_surface(plant=True), studies=('budget_matched',))
  cells[0]['final_eval_loss'].append(1.0)
  with pytest.raises(errors.UserError, match='one per seed'):
    run(cells)
