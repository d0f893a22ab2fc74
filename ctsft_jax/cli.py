"""What every binary does around its main: logging and user-error handling."""

import functools
import sys

from absl import app
from absl import logging
import jax

from ctsft_jax import errors
from ctsft_jax import preemption

USER_ERROR_EXIT = 2  # a bad flag, config value or input file
# preemption.PREEMPTED_EXIT (75): stopped by SIGTERM after a checkpoint.


def log_start(config) -> None:
  """Logs the devices and the resolved config, as the first thing a run does."""
  logging.info(
      'JAX %s on %s: %d device(s) %s, %d process(es)',
      jax.__version__,
      jax.default_backend(),
      jax.device_count(),
      [d.device_kind for d in jax.local_devices()],
      jax.process_count(),
  )
  logging.info('Config:\n%s', config)


class _QuietLibraries:
  """Drops the INFO lines of checkpointing internals from the absl log."""

  NOISY = ('/orbax/', '/etils/', '/tensorstore/')

  def filter(self, record) -> bool:
    return record.levelno > 20 or not any(
        part in record.pathname for part in self.NOISY
    )


def quiet_libraries() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())


def run(main) -> None:
  """`app.run(main)`, turning a UserError into one line and exit status 2."""

  @functools.wraps(main)
  def guarded(argv):
    quiet_libraries()
    try:
      return main(argv)
    except errors.UserError as e:
      sys.stderr.write(f'error: {e}\n')
      sys.stderr.flush()
      sys.exit(USER_ERROR_EXIT)
    except preemption.Preempted as e:
      sys.stderr.write(f'preempted: {e}\n')
      sys.stderr.flush()
      sys.exit(preemption.PREEMPTED_EXIT)

  app.run(guarded)
