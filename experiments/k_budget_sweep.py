r"""Runs the K-budget study: every K at its budget-matched step count.

  python -m experiments.k_budget_sweep --workdir=runs/paper82 \
    [--config=experiments/configs/paper82.py[:smoke]] [--config.seeds=8]

Writes config.json, results.json, report.md, the figures and Orbax
checkpoints to --workdir. Rerunning the same command resumes.
"""

import os

from absl import flags
from ml_collections import config_flags

from ctsft_jax import cli
from ctsft_jax import sweep

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(__file__), 'configs', 'paper82.py'
)
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Experiment config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for results and checkpoints.', required=True
)
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Discard a workdir made with a different config.'
)


def main(argv):
  del argv
  sweep.run_sweep(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)


if __name__ == '__main__':
  cli.run(main)
