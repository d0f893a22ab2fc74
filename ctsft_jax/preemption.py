"""Turning SIGTERM (a preemption notice) into a clean checkpoint and exit.

While a `Guard` is active, SIGTERM only sets a flag. The trainer checks the
flag after every chunk: it writes a checkpoint of the state it has, waits for
the write to finish and raises `Preempted`, which the binaries turn into exit
status PREEMPTED_EXIT. Rerunning the same command continues from that
checkpoint, with no step done twice or skipped.
"""

import signal
import threading

from absl import logging

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request, rerun to continue


class Preempted(Exception):
  """Raised once the state is checkpointed after a SIGTERM."""


_requested = threading.Event()


def requested() -> bool:
  return _requested.is_set()


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
