r"""Pretrains the base model on stdlib source and saves an Orbax checkpoint.

  python -m experiments.pretrain --checkpoint=runs/base \
    [--config=experiments/configs/paper82.py] [--config.base.pretrain_steps=2000]

Pass the directory to a sweep with --config.base.checkpoint=runs/base.
"""

import os

from absl import flags
from absl import logging
from ml_collections import config_flags

from ctsft_jax import base
from ctsft_jax import checkpoint
from ctsft_jax import cli
from ctsft_jax import environment
from ctsft_jax import validate

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(__file__), 'configs', 'paper82.py'
)
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Experiment config file.', lock_config=True
)
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'Directory to write the base to.', required=True
)


def main(argv):
  del argv
  config = _CONFIG.value
  validate.check_config(config)
  environment.log_start(config)
  params, loss = base.pretrain(config, cache_dir=base.cache_root(config))
  checkpoint.save_params(_CHECKPOINT.value, params)
  logging.info('Final pretraining loss %.4f; wrote %s', loss, _CHECKPOINT.value)


if __name__ == '__main__':
  cli.run(main)
