"""The preemption flag, alone and agreed between the processes of a job."""

import numpy as np
import pytest

from ctsft_jax import preemption


@pytest.fixture
def clear_flag():
  preemption._requested.clear()  # pylint: disable=protected-access
  yield
  preemption._requested.clear()  # pylint: disable=protected-access


def test_one_process_agrees_with_its_own_flag(clear_flag):
  del clear_flag
  assert not preemption.agreed()
  preemption._requested.set()  # pylint: disable=protected-access
  assert preemption.agreed()


@pytest.mark.parametrize(
    'local, others, expected',
    [(False, [0, 1, 0], True), (False, [0, 0, 0], False), (True, [0, 0], True)],
)
def test_every_process_stops_when_any_was_signalled(
    clear_flag, monkeypatch, local, others, expected
):
  """Process 0 of a 3-process job sees the others' flags via an all-gather."""
  del clear_flag
  if local:
    preemption._requested.set()  # pylint: disable=protected-access
  gathered = []

  def allgather(value):
    gathered.append(int(value))
    return np.asarray([int(value)] + others[1:])

  monkeypatch.setattr(preemption.jax, 'process_count', lambda: len(others))
  monkeypatch.setattr(
      preemption.multihost_utils, 'process_allgather', allgather
  )
  assert preemption.agreed() is expected
  assert gathered == [int(local)]  # this process's own flag was shared
