"""Per-step metrics of a sweep on disk, and a progress display while it runs.

`MetricsWriter` records the train loss of every step and the eval losses of
every evaluated step of one run (one K, all lanes) as JSON lines in
`{workdir}/metrics/{run_id}.jsonl`, one line per (step, lane):

  {"step": 12, "K": 8, "seed": 0, "lr": 0.001, "train_loss": 2.71}
  {"step": 40, "K": 8, "seed": 0, "lr": 0.001, "eval_loss": 2.65}

`step` counts completed optimizer steps: the train loss at step t is the loss
of the t-th update (computed before it is applied), and the eval loss at step
t is measured after t updates. A non-finite loss is written as null.

A resumed run reopens its file with `start_step` = the checkpoint's step; the
lines of later steps (written before the interruption, to be trained again)
are dropped first, so no step is recorded twice. `read_metrics` also keeps
only the last line of each (run, step, lane, metric), so a file appended to
by hand stays readable.

With `tensorboard=True` the same scalars also go to TensorBoard event files in
`{workdir}/tensorboard/{run_id}/` (needs the optional `tensorboardX` package),
tagged `train_loss/K8/seed0` (`.../lr0.001` appended when the lanes have
more than one learning rate).
A resumed run purges the events after its start step, as TensorBoard expects.

`Progress` shows how far a run is: a tqdm bar with ETA and throughput when
stderr is a terminal (or in a Jupyter kernel), otherwise an absl log line at
most every `log_every_s` seconds.
"""

import contextlib
import glob
import importlib
import importlib.util
import json
import math
import numbers
import os
import sys
import tempfile
import time
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import numpy as np

from ctsft_jax import errors

METRICS_DIR = 'metrics'  # JSONL files, under the workdir
TENSORBOARD_DIR = 'tensorboard'  # event files, one folder per run
TRAIN_LOSS = 'train_loss'
# Eval sets (as named by the sweep) -> metric name; others get eval_{name}.
EVAL_NAMES = {'report': 'eval_loss'}
LOG_EVERY_S = 10.0  # seconds between progress log lines


def _lane_fields(lane) -> dict:
  """{'seed': s} for an integer lane, {'seed': s, 'lr': lr} for a pair."""
  if isinstance(lane, numbers.Integral):
    return {'seed': int(lane)}
  seed, lr = lane
  return {'seed': int(seed), 'lr': float(lr)}


def _json_number(value) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


def _run_lines(path: str) -> list[dict]:
  """The parsed records of one JSONL file; a torn last line is skipped."""
  records = []
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.readlines()
  except FileNotFoundError:
    return records
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      # An interrupted write leaves at most a partial last line.
      logging.warning('%s line %d is not JSON; skipped', path, number)
  return records


def _rewrite(path: str, records: list[dict]) -> None:
  """Replaces `path` with `records`, one a line, atomically."""
  directory = os.path.dirname(path)
  handle, temp_path = tempfile.mkstemp(dir=directory, suffix='.jsonl.tmp')
  try:
    with os.fdopen(handle, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r) + '\n' for r in records)
    os.replace(temp_path, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(temp_path)
    raise


def _summary_writer(logdir: str, start_step: int):
  """A tensorboardX SummaryWriter, or a one-line UserError without it.

  Event files are named by the second they were opened in; the start step
  is appended so that a resume within the same second neither overwrites
  the earlier file nor sorts before it (TensorBoard reads them in name
  order). A resumed run purges the events after its start step.
  """
  try:
    tensorboardx = importlib.import_module('tensorboardX')
  except ImportError:
    raise errors.UserError(
        'train.tensorboard=True needs the tensorboardX package; run `pip'
        " install tensorboardX` (or `pip install -e '.[tensorboard]'`), or"
        ' set train.tensorboard=False'
    ) from None
  return tensorboardx.SummaryWriter(
      logdir=logdir,
      purge_step=start_step + 1 if start_step > 0 else None,
      flush_secs=10,
      filename_suffix=f'.step{start_step:010d}',
  )


class MetricsWriter:
  """Appends the per-step losses of one run's lanes to JSONL (and TensorBoard).

  Use one writer per run: create it after restoring the run's checkpoint,
  call `train` after every stretch of steps and `eval` after every
  evaluation, and `close` at the end.
  """

  def __init__(
      self,
      workdir: str,
      *,
      run_id: str,
      rank: int,
      lanes: Sequence[Any],
      start_step: int = 0,
      tensorboard: bool = False,
  ):
    """Opens the run's files, dropping what lies after `start_step`.

    Args:
      workdir: the sweep's workdir.
      run_id: names the files, e.g. 'K8_steps160'.
      rank: K, written into every line.
      lanes: one entry per lane: an integer seed, or a (seed, lr) pair
        (the sweep's `ctx.lanes`).
      start_step: steps already trained (the restored checkpoint's step, 0
        for a fresh run). Lines of later steps are removed.
      tensorboard: also write TensorBoard event files (needs tensorboardX).
    """
    self.rank = int(rank)
    self.lanes = [_lane_fields(lane) for lane in lanes]
    self._tag_lr = len({lane.get('lr') for lane in self.lanes}) > 1
    self.path = os.path.join(workdir, METRICS_DIR, f'{run_id}.jsonl')
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    kept = [r for r in _run_lines(self.path) if r.get('step', 0) <= start_step]
    _rewrite(self.path, kept)
    self._file = open(self.path, 'a', encoding='utf-8')
    self._tb = None
    if tensorboard:
      self._tb = self._open_tensorboard(workdir, run_id, start_step)

  def _open_tensorboard(self, workdir: str, run_id: str, start_step: int):
    logdir = os.path.join(workdir, TENSORBOARD_DIR, run_id)
    if start_step == 0:
      # A fresh run replaces whatever an earlier attempt logged.
      for old in glob.glob(os.path.join(logdir, 'events.out.tfevents.*')):
        os.remove(old)
    return _summary_writer(logdir, start_step)

  def _tag(self, metric: str, lane: dict) -> str:
    tag = f"{metric}/K{self.rank}/seed{lane['seed']}"
    return tag + (f"/lr{lane['lr']:g}" if self._tag_lr else '')

  def _write(self, metric: str, step: int, values) -> None:
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size != len(self.lanes):
      raise ValueError(
          f'{metric}: {values.size} values for {len(self.lanes)} lanes'
      )
    for lane, value in zip(self.lanes, values):
      record = {'step': int(step), 'K': self.rank, **lane}
      record[metric] = _json_number(value)
      self._file.write(json.dumps(record) + '\n')
      if self._tb is not None and record[metric] is not None:
        self._tb.add_scalar(self._tag(metric, lane), value, int(step))

  def train(self, step: int, losses) -> None:
    """Records train losses [n, L] of the n steps that end at `step`."""
    losses = np.asarray(losses, np.float64).reshape(-1, len(self.lanes))
    first = int(step) - len(losses) + 1
    for offset, row in enumerate(losses):
      self._write(TRAIN_LOSS, first + offset, row)
    self._file.flush()

  def eval(self, step: int, losses) -> None:
    """Records eval losses at `step`: [L] values, or {eval set: [L] values}.

    Values may be None (as the sweep stores non-finite losses).

    The sweep's 'report' set is written as `eval_loss`; any other set `name`
    (such as 'select', with a learning-rate grid) as `eval_{name}_loss`.
    """
    if not isinstance(losses, Mapping):
      losses = {'report': losses}
    for name, values in losses.items():
      self._write(EVAL_NAMES.get(name, f'eval_{name}_loss'), step, values)
    self._file.flush()

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


class NullWriter:
  """A MetricsWriter that writes nothing: for the processes of a multi-host
  job other than process 0, which alone writes the workdir's files."""

  def train(self, step: int, losses) -> None:
    del step, losses

  def eval(self, step: int, losses) -> None:
    del step, losses

  def close(self) -> None:
    pass


def read_metrics(workdir: str, run_id: str | None = None) -> list[dict]:
  """The metric lines of a workdir (or of one run), deduplicated and sorted.

  Each returned dict is one JSONL line plus `run` (its file's run id). Of
  several lines for the same (run, step, lane, metric) the last one is kept.

  Returns:
    The records sorted by (run, step, seed, lr, metric).
  """
  pattern = f'{run_id}.jsonl' if run_id else '*.jsonl'
  latest = {}
  for path in sorted(glob.glob(os.path.join(workdir, METRICS_DIR, pattern))):
    run = os.path.basename(path)[: -len('.jsonl')]
    for record in _run_lines(path):
      metrics = [k for k in record if k == TRAIN_LOSS or k.startswith('eval')]
      for metric in metrics:
        key = (
            run,
            record['step'],
            record.get('seed'),
            record.get('lr'),
            metric,
        )
        latest[key] = {
            'run': run,
            **{k: v for k, v in record.items() if k not in metrics},
            metric: record[metric],
        }
  return [latest[key] for key in sorted(latest, key=_sort_key)]


def _sort_key(key: tuple) -> tuple:
  run, step, seed, lr, metric = key
  return (run, step, -1 if seed is None else seed, lr or 0.0, metric)


def _in_notebook() -> bool:
  """Whether this process is an IPython kernel (Jupyter, Colab)."""
  shell = sys.modules.get('IPython')
  if shell is None or 'ipykernel' not in sys.modules:
    return False
  ipython = shell.get_ipython()
  return ipython is not None and hasattr(ipython, 'kernel')


def _tqdm_class(mode: str):
  """The tqdm class to use for `mode`, or None for log lines."""
  if mode == 'log':
    return None
  notebook = _in_notebook()
  if mode == 'auto' and not (notebook or sys.stderr.isatty()):
    return None
  try:
    if notebook and importlib.util.find_spec('ipywidgets') is not None:
      return importlib.import_module('tqdm.notebook').tqdm
    return importlib.import_module('tqdm').tqdm
  except ImportError:
    return None  # tqdm is optional; log lines instead.


class Progress:
  """Progress of one run: a tqdm bar, or rate-limited absl log lines.

  Both show the step, throughput (steps/s since `start_step`), ETA and the
  last train loss of every lane.
  """

  def __init__(
      self,
      label: str,
      total: int,
      start_step: int = 0,
      *,
      mode: str = 'auto',
      log_every_s: float = LOG_EVERY_S,
  ):
    """Starts the display.

    Args:
      label: names the run, e.g. 'K=8'.
      total: the step the run ends at.
      start_step: steps done before this display starts (a resumed run).
      mode: 'auto' (a bar when stderr is a terminal or in a notebook and
        tqdm is installed, else log lines), 'bar' (a bar whenever tqdm is
        installed) or 'log'.
      log_every_s: least seconds between two log lines.
    """
    if mode not in ('auto', 'bar', 'log'):
      raise errors.UserError(f'progress mode={mode!r}; expected auto|bar|log')
    self.label, self.total = label, int(total)
    self.start_step = self.step = int(start_step)
    self.log_every_s = log_every_s
    self.start = time.perf_counter()
    self.last_log = -math.inf
    self.logged_step = None
    self.losses = None
    bar_class = _tqdm_class(mode)
    self.bar = None
    if bar_class is not None:
      self.bar = bar_class(
          total=self.total,
          initial=self.start_step,
          desc=label,
          unit='step',
          dynamic_ncols=True,
      )

  def rate(self) -> float:
    """Steps per second since the display started."""
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    return (self.step - self.start_step) / elapsed

  def update(self, step: int, losses: Iterable[float]) -> None:
    """Shows that `step` steps are done; `losses` is the last step's [L]."""
    self.step = int(step)
    self.losses = np.asarray(losses, np.float64).reshape(-1)
    if self.bar is not None:
      self.bar.update(self.step - self.bar.n)
      self.bar.set_postfix_str(
          'loss ' + np.array2string(self.losses, precision=3), refresh=False
      )
      return
    now = time.perf_counter()
    if now - self.last_log >= self.log_every_s or self.step >= self.total:
      self.last_log = now
      self._log()

  def _log(self) -> None:
    rate = self.rate()
    eta = (self.total - self.step) / rate if rate > 0 else math.inf
    losses = (
        '-'
        if self.losses is None
        else np.array2string(self.losses, precision=3)
    )
    logging.info(
        '%s: step %d/%d (%.0f%%), %.1f steps/s, ETA %.0fs, train loss %s',
        self.label,
        self.step,
        self.total,
        100 * self.step / max(self.total, 1),
        rate,
        eta,
        losses,
    )
    self.logged_step = self.step

  def close(self) -> None:
    """Ends the bar, or logs the last step if it was not logged yet."""
    if self.bar is not None:
      self.bar.close()
    elif self.logged_step != self.step and self.step > self.start_step:
      self._log()
