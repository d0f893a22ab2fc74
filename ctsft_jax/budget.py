"""Budget math and the plan: which (study, K, steps) cells a sweep trains.

The budget is in param-steps, trainable_params(K) x steps. By default it is
anchored as trainable_params(anchor K) x anchor steps (32 x 40, as in the
reference study), and every K gets

  steps(K) = round(budget / trainable_params(K))

rounded half up to an integer. Because trainable_params is linear in K, the
default anchor gives 640, 320, 160, 80, 40 and 20 steps for K = 2 ... 64 on any
model. A K whose rounded count would be below one step is an error.

Cells are grouped by K into runs. With a schedule that does not depend on the
run length (constant after warmup), one run per K trains to that K's longest
cell and every shorter cell is evaluated on the way (prefix sharing). With a
decaying schedule each distinct step count is its own run.
"""

import dataclasses
import math

import ml_collections

from ctsft_jax import errors

STUDIES = ('budget_matched', 'budget_multipliers', 'crossover')
# Budget axes other than param-steps, and the study that matches each one.
AXIS_STUDIES = {'flops': 'flops_matched', 'wall_s': 'wallclock_matched'}


@dataclasses.dataclass(frozen=True)
class Cell:
  """One (study, K, steps) point, trained for every seed."""

  study: str
  rank: int
  steps: int
  multiplier: float | None = None  # budget_multipliers: times the budget
  pair: int | None = None  # crossover: the high-K step count it pairs with


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of one K, evaluated at each of `eval_steps`."""

  rank: int
  total_steps: int  # the run's length; decaying schedules end here
  eval_steps: tuple[int, ...]  # ascending, the last is total_steps


@dataclasses.dataclass(frozen=True)
class Plan:
  budget: int  # param-steps
  trainable: dict[int, int]  # K -> trainable_params(K)
  cells: tuple[Cell, ...]
  runs: dict[int, tuple[Run, ...]]  # K -> its runs, ascending K
  prefix_shared: bool

  @property
  def train_steps(self) -> int:
    """Steps the plan trains, per lane."""
    return sum(r.total_steps for runs in self.runs.values() for r in runs)

  @property
  def unshared_steps(self) -> int:
    """Steps the plan would train with one run per distinct (K, steps)."""
    return sum(
        sum({c.steps for c in self.cells if c.rank == k}) for k in self.runs
    )


def steps_for(budget: float, trainable_params: int, *, rank: int) -> int:
  """round(budget / trainable_params), half up; at least one step."""
  steps = math.floor(budget / trainable_params + 0.5)
  if steps < 1:
    raise errors.UserError(
        f'K={rank} gets {budget / trainable_params:.3g} steps from a budget of'
        f' {budget:.4g} param-steps ({trainable_params} trainable params);'
        ' raise the budget or drop that K'
    )
  return steps


def budget_param_steps(budget_config, trainable: dict[int, int]) -> int:
  """The budget: absolute `param_steps` if set, else anchor K x anchor steps."""
  if budget_config.param_steps > 0:
    return int(budget_config.param_steps)
  anchor = budget_config.anchor_rank
  if anchor not in trainable:
    raise errors.UserError(
        f'budget.anchor_rank={anchor} is not one of the planned ranks'
        f' {sorted(trainable)}'
    )
  return trainable[anchor] * budget_config.anchor_steps


def ranks_needed(studies: ml_collections.ConfigDict) -> list[int]:
  """Every K that the enabled studies train (the anchor K may not be one)."""
  ranks = set()
  if studies.budget_matched.enabled:
    ranks.update(studies.budget_matched.ranks)
  if studies.budget_multipliers.enabled:
    ranks.add(studies.budget_multipliers.rank)
  if studies.crossover.enabled:
    ranks.update((studies.crossover.high_rank, studies.crossover.low_rank))
  return sorted(ranks)


def plan_cells(studies, budget: int, trainable: dict[int, int]) -> list[Cell]:
  cells = []
  if studies.budget_matched.enabled:
    for k in studies.budget_matched.ranks:
      cells.append(
          Cell('budget_matched', k, steps_for(budget, trainable[k], rank=k))
      )
  if studies.budget_multipliers.enabled:
    k = studies.budget_multipliers.rank
    for m in studies.budget_multipliers.multipliers:
      steps = steps_for(budget * m, trainable[k], rank=k)
      cells.append(Cell('budget_multipliers', k, steps, multiplier=float(m)))
  if studies.crossover.enabled:
    high, low = studies.crossover.high_rank, studies.crossover.low_rank
    for s in studies.crossover.high_steps:
      low_steps = steps_for(s * trainable[high], trainable[low], rank=low)
      cells.append(Cell('crossover', high, int(s), pair=int(s)))
      cells.append(Cell('crossover', low, low_steps, pair=int(s)))
  return cells


def axis_cells(
    ranks,
    cost_per_step: dict[int, float],
    *,
    study: str,
    anchor_rank: int,
    anchor_steps: int,
) -> list[Cell]:
  """Cells matched on another budget axis (FLOPs, seconds).

  The budget on that axis is cost(anchor K) x anchor steps, and K gets
  round(budget / cost_per_step(K)) steps, as for param-steps.
  """
  budget = cost_per_step[anchor_rank] * anchor_steps
  return [
      Cell(study, k, steps_for(budget, cost_per_step[k], rank=k)) for k in ranks
  ]


def make_plan(
    studies,
    budget: int,
    trainable: dict[int, int],
    *,
    prefix_shared: bool,
    extra_cells: tuple[Cell, ...] = (),
) -> Plan:
  """Groups the cells of the enabled studies (plus `extra_cells`) into runs."""
  cells = plan_cells(studies, budget, trainable) + list(extra_cells)
  if not cells:
    raise errors.UserError('no study is enabled; enable one under studies.*')
  runs = {}
  for k in sorted({c.rank for c in cells}):
    steps = sorted({c.steps for c in cells if c.rank == k})
    if prefix_shared:
      runs[k] = (Run(k, steps[-1], tuple(steps)),)
    else:
      runs[k] = tuple(Run(k, s, (s,)) for s in steps)
  return Plan(budget, dict(trainable), tuple(cells), runs, prefix_shared)


def setup_rows(plan: Plan) -> list[dict]:
  """The paper's Setup table: K, trainable params, steps, param-steps."""
  rows = []
  for c in plan.cells:
    if c.study == 'budget_matched':
      rows.append(
          dict(
              K=c.rank,
              trainable_params=plan.trainable[c.rank],
              steps=c.steps,
              param_steps=plan.trainable[c.rank] * c.steps,
          )
      )
  return rows
