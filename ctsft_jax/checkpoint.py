"""Orbax checkpoints of run state and base parameters, and atomic JSON files.

A run's directory holds one Orbax step directory per save. Each save has two
items: `state` (the LaneState pytree: factors, optimizer state, lane status,
step) and `progress` (JSON: the per-step train losses and the eval results
recorded so far), so a resumed run continues with nothing lost or redone.
Orbax writes each step to a temporary directory and renames it when complete,
so a crash mid-save never leaves a directory that counts as the latest.
"""

import copy
import json
import os
import tempfile
from typing import Any

import jax
import orbax.checkpoint as ocp

from ctsft_jax import errors

PyTree = Any


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically: a temp file in the same dir, then a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.json')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(obj, f, indent=1, allow_nan=False)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """Writes a text file atomically (temp file, then rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-')
  with os.fdopen(fd, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def ensure_writable(workdir: str) -> None:
  """Creates `workdir` and proves a file can be written there (UserError)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write-probe')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise errors.UserError(
        f'--workdir={workdir} cannot be written ({e.strerror}); choose a'
        ' writable directory'
    ) from None


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _refuse_symlinks(directory: str) -> None:
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      if os.path.islink(os.path.join(root, name)):
        raise errors.UserError(
            f'checkpoint {directory} contains a symbolic link'
            f' ({os.path.join(root, name)}); refusing to restore from it'
        )


class RunCheckpoints:
  """Saves and restores one run's state with an Orbax CheckpointManager."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            cleanup_tmp_directories=True,
            create=True,
        ),
        item_names=('state', 'progress'),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: PyTree, progress: dict) -> None:
    """Saves asynchronously; `wait` (or `close`) makes it durable.

    `progress` is copied first: the JSON is written in the background while
    the caller goes on appending to its lists, and the saved copy must match
    the saved state's step exactly.
    """
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            progress=ocp.args.JsonSave(copy.deepcopy(progress)),
        ),
        force=True,
    )

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict]:
    _refuse_symlinks(self.directory)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            progress=ocp.args.JsonRestore(),
        ),
    )
    return restored.state, restored.progress

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def save_params(directory: str, params: PyTree) -> None:
  """Saves a parameter tree (e.g. a pretrained base) to `directory`."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), params, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()


def check_params(directory: str, abstract_params: PyTree) -> None:
  """Raises UserError unless `directory` holds params of the given shapes."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise errors.UserError(
        f'base.checkpoint={directory} does not exist; give a directory written'
        ' by experiments.pretrain, or leave it empty to pretrain one'
    )
  _refuse_symlinks(directory)
  checkpointer = ocp.StandardCheckpointer()
  try:
    stored = checkpointer.metadata(directory)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(
        f'base.checkpoint={directory} is not a readable Orbax checkpoint'
        f' ({type(e).__name__}); give a directory written by'
        ' experiments.pretrain'
    ) from None
  finally:
    checkpointer.close()
  stored_tree = getattr(stored, 'item_metadata', stored)
  stored_tree = getattr(stored_tree, 'tree', stored_tree)
  got = jax.tree.map(lambda m: tuple(m.shape), dict(stored_tree))
  want = jax.tree.map(lambda s: tuple(s.shape), abstract_params)
  if got != want:
    raise errors.UserError(
        f'base.checkpoint={directory} holds parameters of other shapes than'
        ' the model config; pretrain a base for this model config'
    )


def restore_params(directory: str, abstract_params: PyTree) -> PyTree:
  """Restores a parameter tree, checking it against the expected shapes."""
  check_params(directory, abstract_params)
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(os.path.abspath(directory), abstract_params)
  finally:
    checkpointer.close()
