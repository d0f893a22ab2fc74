r"""The benchmark of the sweep engine: the whole paper 82 study.

Launch (about 17 minutes on a 2-core CPU, half of it the straightforward
loop):

  python -m experiments.benchmark --workdir=runs/benchmark

Smoke variant (a tiny model, two K, synthetic data; under a minute):

  python -m experiments.benchmark --workdir=/tmp/bench \
    --config=experiments/configs/benchmark.py:smoke

The default is paper82.py, 4 seeds, every study except wallclock_matched
(its step counts come from a timing calibration, so they would differ
between the two ways), with a random base (its values do not change the
work, and it needs no pretraining): 26 cells at 21 distinct (K, steps)
points, 5,789 steps per lane with prefix sharing and 11,146 without.
Override any key, e.g. `--config.seeds=8` or
`--config.benchmark.straightforward=False`.
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
