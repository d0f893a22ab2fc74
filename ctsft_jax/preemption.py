"""Turning SIGTERM (a preemption notice) into a clean checkpoint and exit.

While a `Guard` is active, SIGTERM only sets a flag. The trainer checks the
flag after every chunk: it writes a checkpoint of the state it has, waits for
the write to finish and raises `Preempted`, which the binaries turn into exit
status PREEMPTED_EXIT. Rerunning the same command continues from that
checkpoint, with no step done twice or skipped.

In a multi-host job SIGTERM reaches the hosts at slightly different moments,
and a checkpoint needs every process. `agreed` therefore asks all processes
(one tiny all-gather per chunk) and every process stops at the same step if
any of them was signalled.
"""

import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request, rerun to continue


class Preempted(Exception):
  """Raised once the state is checkpointed after a SIGTERM."""


_requested = threading.Event()


def requested() -> bool:
  """Whether this process has received SIGTERM."""
  return _requested.is_set()


def agreed() -> bool:
  """Whether any process of the job has received SIGTERM.

  Every process must call it at the same point (the trainer does, once per
  chunk); with one process it is `requested()`.
  """
  if jax.process_count() == 1:
    return requested()
  flags = multihost_utils.process_allgather(np.int32(requested()))
  return bool(np.any(flags))


class Guard:
  """Context manager: SIGTERM sets the preemption flag instead of killing."""

  def __enter__(self):
    _requested.clear()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning(
        'Signal %d: checkpointing after this chunk, then exiting', signum
    )
    _requested.set()

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False
