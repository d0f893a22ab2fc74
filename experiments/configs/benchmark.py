r"""The benchmark of the sweep engine: the paper 82 study, shortened.

Launch (about 13 minutes on a 2-core CPU, a third of it the straightforward
loop; measured on a shared machine, so a quiet one may be faster):

  python -m experiments.benchmark --workdir=runs/benchmark

Smoke variant (a tiny model, two K, synthetic data; about a minute):

  python -m experiments.benchmark --workdir=/tmp/bench \
    --config=experiments/configs/benchmark.py:smoke

The default is paper82.py with a random base (its values do not change the
work, and it needs no pretraining), every study on except wallclock_matched
(its step counts come from a timing calibration), and with the two longest
K=2 families cut so that the per-step loop fits the time: budget multipliers
at 1x only (not 2x, 4x, 8x) and crossover at K=32 steps 5 ... 40 (not 80).
That leaves 4 seeds and 21 cells at 17 distinct (K, steps) points. For the
whole study pass `--config=experiments/configs/paper82.py` (an estimated 50
minutes on 2 cores, plus pretraining the base on first use; its `:smoke`
variant takes about 3 minutes). Override any key of this file, e.g.
`--config.seeds=8` or `--config.benchmark.straightforward=False`.
"""

import ml_collections

from ctsft_jax import benchmark
from experiments.configs import paper82


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """paper82's config (or its smoke variant) plus a `benchmark` section."""
  config = paper82.get_config('smoke' if arg == 'smoke' else None)
  if arg not in (None, 'smoke'):
    raise ValueError(f'unknown config argument {arg!r}; use smoke or nothing')
  config.unlock()
  # The base's values do not change the work; a random one skips pretraining.
  config.base.kind = 'random'
  config.studies.wallclock_matched.enabled = False
  config.studies.budget_multipliers.multipliers = (1,)  # x budget
  config.studies.crossover.high_steps = (5, 10, 20, 40)  # steps of high K
  config.benchmark = benchmark.default_settings()
  if arg == 'smoke':
    config.data.source = 'synthetic'  # no stdlib corpus to read
    config.studies.budget_matched.ranks = (2, 8)
    config.budget.anchor_rank = 8  # K=2 gets 32 steps, K=8 gets 8
    config.budget.anchor_steps = 8
    config.studies.budget_multipliers.multipliers = (1, 2)
    config.studies.crossover.high_rank = 8
    config.studies.crossover.high_steps = (2, 4, 8)
    config.train.chunk_steps = 16
    config.benchmark.scaling_seeds = (1, 2)
    config.benchmark.scaling_steps = 5
    config.benchmark.matmul_sizes = (256, 512, 1024)
    config.benchmark.matmul_min_s = 0.2
  config.lock()
  return config
