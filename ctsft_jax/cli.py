"""What every binary does around its main: logging and user-error handling."""

import functools
import sys

from absl import app
from absl import flags
from absl import logging

from ctsft_jax import errors
from ctsft_jax import preemption

USER_ERROR_EXIT = 2  # a bad flag, config value or input file
# preemption.PREEMPTED_EXIT (75): stopped by SIGTERM after a checkpoint.


class _QuietLibraries:
  """Drops the INFO lines of checkpointing internals from the absl log."""

  NOISY = ('/orbax/', '/etils/', '/tensorstore/', '/jax/_src/xla_bridge')

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

  app.run(guarded, flags_parser=_parse_flags)


def _one_line(error: BaseException) -> str:
  if isinstance(error, KeyError):
    key = str(error.args[0] if error.args else error).strip('\'"')
    return (
        f'unknown config key {key!r}; see the config file for the keys that'
        ' exist'
    )
  text = ' '.join(str(error).split())
  return text or type(error).__name__


def _parse_flags(argv):
  """absl flag parsing whose errors are one line and exit status 2.

  Config files are loaded while flags are parsed, so a missing or broken
  config file and an unknown override key are reported here too.
  """
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    cause = e.__cause__ or e.__context__
    if isinstance(cause, KeyError) and not isinstance(e, KeyError):
      e = cause
    sys.stderr.write(f'error: {_one_line(e)}\n')
    sys.stderr.flush()
    sys.exit(USER_ERROR_EXIT)
