"""Checkpoints: atomic JSON, the fallback past a corrupt step, symlinks."""

import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

from ctsft_jax import budget as budget_lib
from ctsft_jax import checkpoint
from ctsft_jax import errors
from ctsft_jax import sweep


def _state(value):
  return {'w': jnp.full((3,), value, jnp.float32), 'step': jnp.int32(value)}


def _programs():
  return types.SimpleNamespace(init=lambda: _state(0.0))


def _save_steps(directory, steps):
  ckpts = checkpoint.RunCheckpoints(directory)
  for step in steps:
    ckpts.save(step, _state(float(step)), {'train_loss': [[1.0]] * step})
  ckpts.wait()
  ckpts.close()


def _restore(directory):
  ckpts = checkpoint.RunCheckpoints(directory)
  run = budget_lib.Run(rank=2, total_steps=10, eval_steps=(10,))
  try:
    return sweep._restore_or_init(ckpts, _programs(), run, ())  # pylint: disable=protected-access
  finally:
    ckpts.close()


def test_latest_complete_checkpoint_is_restored(tmp_path):
  _save_steps(str(tmp_path), [4, 8])
  state, progress = _restore(str(tmp_path))
  np.testing.assert_array_equal(state['w'], np.full(3, 8.0))
  assert len(progress['train_loss']) == 8


def test_corrupt_latest_falls_back_to_the_previous(tmp_path):
  _save_steps(str(tmp_path), [4, 8])
  for root, _, files in os.walk(os.path.join(str(tmp_path), '8')):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  state, progress = _restore(str(tmp_path))
  np.testing.assert_array_equal(state['w'], np.full(3, 4.0))
  assert len(progress['train_loss']) == 4


def test_no_checkpoint_gives_a_fresh_state(tmp_path):
  state, progress = _restore(str(tmp_path))
  np.testing.assert_array_equal(state['w'], np.zeros(3))
  assert progress['train_loss'] == []


def test_symlinked_checkpoint_is_refused(tmp_path):
  _save_steps(str(tmp_path / 'run'), [4])
  os.symlink('/etc/hostname', str(tmp_path / 'run' / '4' / 'link'))
  with pytest.raises(errors.UserError, match='symbolic link'):
    _restore(str(tmp_path / 'run'))


def test_write_json_is_atomic_and_rejects_nan(tmp_path):
  path = str(tmp_path / 'results.json')
  checkpoint.write_json(path, {'a': 1})
  with pytest.raises(ValueError):
    checkpoint.write_json(path, {'a': float('nan')})
  assert checkpoint.read_json(path) == {'a': 1}  # the old file survives
  assert os.listdir(str(tmp_path)) == ['results.json']  # no temp file left


def test_saved_progress_is_a_snapshot_of_the_saved_step(tmp_path):
  """Appending to progress after save must not leak into the checkpoint."""
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  progress = {'train_loss': [[1.0]] * 4}
  ckpts.save(4, _state(4.0), progress)
  progress['train_loss'] += [[2.0]] * 1000  # the next chunk, right away
  ckpts.wait()
  ckpts.close()
  _, restored = _restore(str(tmp_path))
  assert len(restored['train_loss']) == 4
