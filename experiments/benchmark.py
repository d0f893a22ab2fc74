r"""Times the sweep engine against a per-step jit loop and the matmul peak.

  python -m experiments.benchmark --workdir=runs/benchmark \
    [--config=experiments/configs/benchmark.py[:smoke]]

Any paper82-style config works (`--config=experiments/configs/paper82.py`
benchmarks the whole study with default settings). Writes benchmark.json and
benchmark.md to --workdir; no checkpoints, and no persistent compilation
cache, so compile times are real.
"""

import os

from absl import flags
from ml_collections import config_flags

from ctsft_jax import benchmark
from ctsft_jax import cli

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(__file__), 'configs', 'benchmark.py'
)
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Study config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for benchmark.json and .md.', required=True
)


def main(argv):
  del argv
  benchmark.run_benchmark(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
