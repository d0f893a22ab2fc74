"""Tests of the budget math and the plan.

Step counts are the reference study's table (640 ... 20), or worked out here by
hand from budget / trainable_params with halves rounded up.
"""

import pytest

from ctsft_jax import budget as budget_lib
from ctsft_jax import errors
from ctsft_jax import flops as flops_lib
from ctsft_jax import sweep
from ctsft_jax import validate
from experiments.configs import paper82

PAPER_STEPS = {2: 640, 4: 320, 8: 160, 16: 80, 32: 40, 64: 20}


def _studies(matched=None, multipliers=None, crossover=None):
  """The paper82 studies section with only the given studies enabled."""
  studies = paper82.get_config().studies
  for name in studies:
    studies[name].enabled = False
  if matched is not None:
    studies.budget_matched.enabled = True
    studies.budget_matched.ranks = matched
  if multipliers is not None:
    studies.budget_multipliers.enabled = True
    studies.budget_multipliers.rank, studies.budget_multipliers.multipliers = (
        multipliers
    )
  if crossover is not None:
    studies.crossover.enabled = True
    high, low, steps = crossover
    studies.crossover.high_rank = high
    studies.crossover.low_rank = low
    studies.crossover.high_steps = steps
  return studies


def _per_layer_dims(model):
  d, d_mlp = model.d_model, model.d_mlp
  return 4 * (d + d) + (d + d_mlp) + (d_mlp + d)


@pytest.mark.parametrize('arg', [None, 'smoke'])
def test_default_plan_gives_the_paper_step_counts(arg):
  config = paper82.get_config(arg)
  rows = budget_lib.setup_rows(sweep.make_plan(config))
  assert {r['K']: r['steps'] for r in rows} == PAPER_STEPS
  m = config.model
  per_rank = m.n_layers * _per_layer_dims(m) + m.d_model + m.vocab_size
  for row in rows:
    assert row['trainable_params'] == row['K'] * per_rank
    assert row['param_steps'] == row['trainable_params'] * row['steps']
    # Linear params make every row spend exactly the anchor's budget.
    assert row['param_steps'] == 32 * per_rank * 40


def test_absolute_param_steps_budget_rounds_half_up(make_config):
  # The tiny model has 500 trainable params per unit of K (224 + 276).
  config = make_config(budget__param_steps=1250)
  plan = sweep.make_plan(config)
  assert plan.budget == 1250
  assert plan.trainable == {1: 500, 2: 1000}
  # 1250 / 500 = 2.5 -> 3 (half up, not to even); 1250 / 1000 = 1.25 -> 1.
  assert {r['K']: r['steps'] for r in budget_lib.setup_rows(plan)} == {
      1: 3,
      2: 1,
  }


def test_anchor_budget_of_the_tiny_config(make_config):
  config = make_config(budget__anchor_rank=2, budget__anchor_steps=5)
  plan = sweep.make_plan(config)
  assert plan.budget == 1000 * 5
  assert {c.rank: c.steps for c in plan.cells} == {1: 10, 2: 5}


def test_budget_below_one_step_names_the_k(make_config):
  # K=1 gets 300 / 500 = 0.6 -> 1 step; K=2 gets 0.3 -> 0 steps.
  config = make_config(budget__param_steps=300)
  with pytest.raises(errors.UserError, match=r'K=2\b') as info:
    sweep.make_plan(config)
  assert 'K=1 ' not in str(info.value)
  assert '\n' not in str(info.value)


@pytest.mark.parametrize(
    'budget, params, expected',
    [
        (25, 10, 3),  # 2.5 rounds up
        (35, 10, 4),  # 3.5 rounds up
        (24, 10, 2),
        (26, 10, 3),
        (15, 10, 2),  # 1.5 rounds up (to even would give 2 as well)
        (5, 10, 1),  # 0.5 rounds up to the one-step minimum
        (640, 1, 640),
    ],
)
def test_steps_for_rounds_half_up(budget, params, expected):
  assert budget_lib.steps_for(budget, params, rank=7) == expected


def test_steps_for_below_half_a_step_raises():
  with pytest.raises(errors.UserError, match='K=7'):
    budget_lib.steps_for(4.9, 10, rank=7)


def test_anchor_rank_outside_the_plan_is_a_user_error():
  budget_config = paper82.get_config().budget  # anchor K=32
  with pytest.raises(errors.UserError, match='anchor_rank=32'):
    budget_lib.budget_param_steps(budget_config, {2: 200, 4: 400})


def test_grid_without_the_anchor_k_still_uses_the_anchor_budget():
  config = paper82.get_config()
  config.studies.budget_matched.ranks = (2, 4, 8)
  config.studies.budget_multipliers.enabled = False
  config.studies.crossover.enabled = False
  rows = budget_lib.setup_rows(sweep.make_plan(config))
  assert {r['K']: r['steps'] for r in rows} == {2: 640, 4: 320, 8: 160}


def test_flops_matched_with_anchor_outside_grid_uses_the_anchor_flops(
    make_config,
):
  config = make_config(budget__param_steps=1250, budget__anchor_rank=4)
  config.studies.flops_matched.enabled = True
  plan = sweep.make_plan(config)
  flops = flops_lib.flops_per_step(config, (1, 2, 4))
  budget = flops[4] * config.budget.anchor_steps
  cells = {c.rank: c.steps for c in plan.cells if c.study == 'flops_matched'}
  assert cells == {k: round(budget / flops[k]) for k in (1, 2)}


def test_repeated_k_is_refused_or_planned_once(make_config):
  config = make_config(studies__budget_matched__ranks=(1, 2, 2))
  try:
    validate.check_config(config)
    plan = sweep.make_plan(config)
  except errors.UserError as e:
    assert 'ranks' in str(e)
    return
  assert len(set(plan.cells)) == len(plan.cells)


def _paper_plan(prefix_shared):
  """The reference study's three studies with 100 params per unit of K."""
  studies = _studies(
      matched=(2, 4, 8, 16, 32, 64),
      multipliers=(2, (1, 2, 4, 8)),
      crossover=(32, 2, (5, 10, 20, 40, 80)),
  )
  trainable = {k: 100 * k for k in (2, 4, 8, 16, 32, 64)}
  return budget_lib.make_plan(
      studies, 100 * 32 * 40, trainable, prefix_shared=prefix_shared
  )


def test_cells_of_the_three_studies():
  plan = _paper_plan(prefix_shared=True)
  by_study = {}
  for c in plan.cells:
    by_study.setdefault(c.study, []).append((c.rank, c.steps))
  assert sorted(by_study['budget_matched']) == sorted(PAPER_STEPS.items())
  assert by_study['budget_multipliers'] == [
      (2, 640),
      (2, 1280),
      (2, 2560),
      (2, 5120),
  ]
  # K=32 at s steps pairs with K=2 at 16 s steps (equal param-steps).
  assert sorted(by_study['crossover']) == sorted(
      [(32, s) for s in (5, 10, 20, 40, 80)]
      + [(2, 16 * s) for s in (5, 10, 20, 40, 80)]
  )
  pairs = {(c.rank, c.pair) for c in plan.cells if c.study == 'crossover'}
  assert (2, 40) in pairs and (32, 40) in pairs


def test_constant_schedule_shares_one_run_per_k():
  plan = _paper_plan(prefix_shared=True)
  assert sorted(plan.runs) == [2, 4, 8, 16, 32, 64]
  for rank, runs in plan.runs.items():
    assert len(runs) == 1
    expected = sorted({c.steps for c in plan.cells if c.rank == rank})
    assert list(runs[0].eval_steps) == expected
    assert runs[0].total_steps == expected[-1]
  assert plan.runs[2][0].eval_steps == (80, 160, 320, 640, 1280, 2560, 5120)
  assert plan.runs[32][0].eval_steps == (5, 10, 20, 40, 80)
  # Per lane: 5120 + 320 + 160 + 80 + 80 + 20 shared, against every
  # distinct (K, steps) trained on its own.
  assert plan.train_steps == 5120 + 320 + 160 + 80 + 80 + 20
  assert plan.unshared_steps == (
      sum((80, 160, 320, 640, 1280, 2560, 5120))
      + 320
      + 160
      + 80
      + sum((5, 10, 20, 40, 80))
      + 20
  )


def test_decaying_schedule_gives_one_run_per_step_count():
  plan = _paper_plan(prefix_shared=False)
  assert [r.total_steps for r in plan.runs[2]] == [
      80,
      160,
      320,
      640,
      1280,
      2560,
      5120,
  ]
  for runs in plan.runs.values():
    for run in runs:
      assert run.eval_steps == (run.total_steps,)
  assert plan.train_steps == plan.unshared_steps


@pytest.mark.parametrize(
    'schedule, shared',
    [('constant', True), ('cosine', False), ('linear', False)],
)
def test_schedule_decides_prefix_sharing(make_config, schedule, shared):
  config = make_config(optim__schedule=schedule)
  config.studies.budget_multipliers.enabled = True
  config.studies.budget_multipliers.rank = 1
  config.studies.budget_multipliers.multipliers = (1, 2)
  plan = sweep.make_plan(config)
  assert plan.prefix_shared is shared
  # K=1: 4000 / 500 = 8 steps (matched and 1x), 16 steps (2x).
  assert len(plan.runs[1]) == (1 if shared else 2)
  assert sorted(s for r in plan.runs[1] for s in r.eval_steps) == [8, 16]


def test_no_enabled_study_is_a_user_error():
  studies = _studies()
  with pytest.raises(errors.UserError, match='no study'):
    budget_lib.make_plan(studies, 100, {}, prefix_shared=True)


def test_axis_cells_match_cost_budget_like_param_steps():
  cells = budget_lib.axis_cells(
      (1, 2, 4),
      {1: 100.0, 2: 150.0, 4: 250.0},
      study='flops_matched',
      anchor_rank=2,
      anchor_steps=4,
  )
  # Budget 150 x 4 = 600: 600/100 = 6, 600/150 = 4, 600/250 = 2.4 -> 2.
  assert [(c.study, c.rank, c.steps) for c in cells] == [
      ('flops_matched', 1, 6),
      ('flops_matched', 2, 4),
      ('flops_matched', 4, 2),
  ]
