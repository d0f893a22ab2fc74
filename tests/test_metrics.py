"""Tests for the metrics writer, its reader and the progress display.

Expected records are written out by hand. TensorBoard files are parsed here
from the TFRecord framing with tensorboardX's Event proto, applying
TensorBoard's purge rule independently of the writer.
"""

import glob
import json
import math
import os
import struct
import sys
from unittest import mock

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from ctsft_jax import errors
from ctsft_jax import metrics


def jsonl_records(workdir, run_id):
  path = os.path.join(workdir, 'metrics', f'{run_id}.jsonl')
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def tfrecords(path):
  """The payloads of a TFRecord file: u64 length, u32 crc, data, u32 crc."""
  with open(path, 'rb') as f:
    blob = f.read()
  records, offset = [], 0
  while offset < len(blob):
    (length,) = struct.unpack('<Q', blob[offset : offset + 8])
    records.append(blob[offset + 12 : offset + 12 + length])
    offset += 12 + length + 4
  return records


def tensorboard_scalars(logdir):
  """{tag: {step: value}} as TensorBoard shows it, purges applied."""
  scalars = {}
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    for payload in tfrecords(path):
      event = event_pb2.Event.FromString(payload)
      if event.session_log.status == event_pb2.SessionLog.START:
        for steps in scalars.values():
          for step in [s for s in steps if s >= event.step]:
            del steps[step]
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_train_and_eval_lines_round_trip(tmp_path):
  workdir = str(tmp_path)
  with metrics.MetricsWriter(
      workdir, run_id='K8_steps4', rank=8, lanes=[0, 1]
  ) as writer:
    writer.train(2, [[3.0, 4.0], [2.5, math.nan]])
    writer.train(4, [[2.0, 3.5], [1.5, 3.0]])
    writer.eval(4, {'report': [1.25, np.inf], 'select': [1.5, 2.5]})
  train = [
      (r['step'], r['seed'], r['train_loss'])
      for r in jsonl_records(workdir, 'K8_steps4')
      if 'train_loss' in r
  ]
  assert train == [
      (1, 0, 3.0),
      (1, 1, 4.0),
      (2, 0, 2.5),
      (2, 1, None),
      (3, 0, 2.0),
      (3, 1, 3.5),
      (4, 0, 1.5),
      (4, 1, 3.0),
  ]
  records = metrics.read_metrics(workdir)
  assert {r['run'] for r in records} == {'K8_steps4'}
  assert {r['K'] for r in records} == {8}
  evals = [r for r in records if 'train_loss' not in r]
  assert evals == [
      {'run': 'K8_steps4', 'step': 4, 'K': 8, 'seed': 0, 'eval_loss': 1.25},
      {
          'run': 'K8_steps4',
          'step': 4,
          'K': 8,
          'seed': 0,
          'eval_select_loss': 1.5,
      },
      {'run': 'K8_steps4', 'step': 4, 'K': 8, 'seed': 1, 'eval_loss': None},
      {
          'run': 'K8_steps4',
          'step': 4,
          'K': 8,
          'seed': 1,
          'eval_select_loss': 2.5,
      },
  ]


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
  workdir = str(tmp_path)
  first = metrics.MetricsWriter(workdir, run_id='K2_steps6', rank=2, lanes=[5])
  first.train(3, [[9.0], [8.0], [7.0]])
  first.eval(3, [6.5])
  first.train(6, [[6.0], [5.0], [4.0]])  # Lost: the checkpoint is at step 3.
  first.close()
  with open(first.path, 'a', encoding='utf-8') as f:
    f.write('{"step": 6, "K": 2, "se')  # A write cut off by the crash.
  second = metrics.MetricsWriter(
      workdir, run_id='K2_steps6', rank=2, lanes=[5], start_step=3
  )
  second.train(6, [[6.5], [5.5], [4.5]])
  second.close()
  lines = jsonl_records(workdir, 'K2_steps6')
  assert [
      (r['step'], r.get('train_loss', r.get('eval_loss'))) for r in lines
  ] == [
      (1, 9.0),
      (2, 8.0),
      (3, 7.0),
      (3, 6.5),
      (4, 6.5),
      (5, 5.5),
      (6, 4.5),
  ]
  fresh = metrics.MetricsWriter(workdir, run_id='K2_steps6', rank=2, lanes=[5])
  fresh.close()
  assert jsonl_records(workdir, 'K2_steps6') == []


def test_reader_keeps_the_last_duplicate_and_filters_by_run(tmp_path):
  workdir = str(tmp_path)
  for run_id in ('K2_steps4', 'K4_steps2'):
    with metrics.MetricsWriter(
        workdir, run_id=run_id, rank=int(run_id[1]), lanes=[(0, 0.01)]
    ) as writer:
      writer.train(2, [[1.0], [2.0]])
  path = os.path.join(workdir, 'metrics', 'K2_steps4.jsonl')
  with open(path, 'a', encoding='utf-8') as f:
    f.write(
        json.dumps(
            {'step': 2, 'K': 2, 'seed': 0, 'lr': 0.01, 'train_loss': 0.5}
        )
        + '\n'
    )
  records = metrics.read_metrics(workdir, 'K2_steps4')
  assert [(r['step'], r['lr'], r['train_loss']) for r in records] == [
      (1, 0.01, 1.0),
      (2, 0.01, 0.5),
  ]
  assert len(metrics.read_metrics(workdir)) == 4


def test_lane_count_mismatch_is_an_error(tmp_path):
  with metrics.MetricsWriter(
      str(tmp_path), run_id='r', rank=1, lanes=[0, 1]
  ) as writer:
    with pytest.raises(ValueError, match='3 values for 2 lanes'):
      writer.eval(1, [1.0, 2.0, 3.0])


def test_tensorboard_scalars_and_resume_purge(tmp_path):
  workdir = str(tmp_path)
  lanes = [(0, 0.001), (1, 0.001)]  # One rate: the tags leave it out.
  first = metrics.MetricsWriter(
      workdir, run_id='K8_steps4', rank=8, lanes=lanes, tensorboard=True
  )
  first.train(4, [[4.0, 40.0], [3.0, 30.0], [2.0, 20.0], [1.0, 10.0]])
  first.eval(2, {'report': [0.5, 5.0]})
  first.close()
  second = metrics.MetricsWriter(
      workdir,
      run_id='K8_steps4',
      rank=8,
      lanes=lanes,
      start_step=2,
      tensorboard=True,
  )
  second.train(3, [[2.5, 25.0]])  # Interrupted again before step 4.
  second.close()
  scalars = tensorboard_scalars(
      os.path.join(workdir, 'tensorboard', 'K8_steps4')
  )
  assert scalars == {
      'train_loss/K8/seed0': {1: 4.0, 2: 3.0, 3: 2.5},
      'train_loss/K8/seed1': {1: 40.0, 2: 30.0, 3: 25.0},
      'eval_loss/K8/seed0': {2: 0.5},
      'eval_loss/K8/seed1': {2: 5.0},
  }


def test_tensorboard_tags_name_the_rate_of_a_learning_rate_grid(tmp_path):
  lanes = [(0, 0.001), (0, 0.01), (1, 0.001), (1, 0.01)]
  with metrics.MetricsWriter(
      str(tmp_path), run_id='K4_steps1', rank=4, lanes=lanes, tensorboard=True
  ) as writer:
    writer.eval(1, {'report': [1.0, None, 3.0, 4.0], 'select': [5, 6, 7, 8]})
  scalars = tensorboard_scalars(str(tmp_path / 'tensorboard' / 'K4_steps1'))
  assert scalars == {
      'eval_loss/K4/seed0/lr0.001': {1: 1.0},
      'eval_loss/K4/seed1/lr0.001': {1: 3.0},
      'eval_loss/K4/seed1/lr0.01': {1: 4.0},
      'eval_select_loss/K4/seed0/lr0.001': {1: 5.0},
      'eval_select_loss/K4/seed0/lr0.01': {1: 6.0},
      'eval_select_loss/K4/seed1/lr0.001': {1: 7.0},
      'eval_select_loss/K4/seed1/lr0.01': {1: 8.0},
  }
  (missing,) = [
      r
      for r in metrics.read_metrics(str(tmp_path))
      if r['lr'] == 0.01 and r['seed'] == 0 and 'eval_loss' in r
  ]
  assert missing['eval_loss'] is None


def test_fresh_run_replaces_old_tensorboard_files(tmp_path):
  workdir = str(tmp_path)
  for value in (7.0, 3.0):
    with metrics.MetricsWriter(
        workdir, run_id='K1_steps1', rank=1, lanes=[0], tensorboard=True
    ) as writer:
      writer.train(1, [[value]])
  logdir = os.path.join(workdir, 'tensorboard', 'K1_steps1')
  assert len(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))) == 1
  assert tensorboard_scalars(logdir) == {'train_loss/K1/seed0': {1: 3.0}}


def test_missing_tensorboardx_names_the_package(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorboardX', None)
  with pytest.raises(errors.UserError) as raised:
    metrics.MetricsWriter(
        str(tmp_path), run_id='r', rank=1, lanes=[0], tensorboard=True
    )
  message = str(raised.value)
  assert 'pip install tensorboardX' in message and '\n' not in message


def fake_clock(times):
  clock = iter(times)
  return mock.patch.object(metrics.time, 'perf_counter', lambda: next(clock))


def test_progress_logs_rate_limited_lines_with_rate_and_eta():
  lines = []
  log = lambda fmt, *args: lines.append(fmt % args)
  # Clock reads: start, then one per update that is not rate-limited away,
  # plus one for each rate computed.
  with fake_clock([100.0, 101.0, 101.0, 103.0, 110.0, 110.0]):
    with mock.patch.object(metrics.logging, 'info', log):
      progress = metrics.Progress(
          'K=8', total=100, start_step=20, mode='log', log_every_s=5.0
      )
      progress.update(30, [2.0, 3.0])  # t=101: logged (first update).
      progress.update(40, [1.5, 2.5])  # t=103: within 5 s, skipped.
      progress.update(100, [1.0, 2.0])  # t=110: the last step, logged.
      progress.close()  # Step 100 was logged; nothing more.
  assert lines == [
      'K=8: step 30/100 (30%), 10.0 steps/s, ETA 7s, train loss [2. 3.]',
      'K=8: step 100/100 (100%), 8.0 steps/s, ETA 0s, train loss [1. 2.]',
  ]


def test_progress_close_logs_an_unlogged_last_step():
  lines = []
  with fake_clock([0.0, 1.0, 1.0, 2.0, 4.0]):
    with mock.patch.object(
        metrics.logging, 'info', lambda fmt, *a: lines.append(fmt % a)
    ):
      progress = metrics.Progress('K=2', 50, mode='log', log_every_s=60.0)
      progress.update(10, [1.0])
      progress.update(20, [0.5])
      progress.close()
  assert [line.split(',')[0] for line in lines] == [
      'K=2: step 10/50 (20%)',
      'K=2: step 20/50 (40%)',
  ]
  assert '5.0 steps/s' in lines[1] and 'ETA 6s' in lines[1]


def test_progress_bar_counts_steps_from_the_start_step(capsys):
  progress = metrics.Progress('K=4', total=80, start_step=40, mode='bar')
  assert progress.bar is not None
  progress.update(60, [2.0])
  progress.update(80, [1.0])
  assert progress.bar.n == 80
  progress.close()
  err = capsys.readouterr().err
  assert 'K=4' in err and '80/80' in err and 'loss [1.]' in err


def test_progress_without_tqdm_falls_back_to_log_lines(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tqdm', None)
  progress = metrics.Progress('K=4', total=8, mode='bar')
  assert progress.bar is None
  with mock.patch.object(metrics.logging, 'info') as info:
    progress.update(8, [1.0])
  assert info.call_count == 1


def test_progress_auto_uses_log_lines_off_a_terminal(monkeypatch):
  monkeypatch.setattr(sys.stderr, 'isatty', lambda: False, raising=False)
  assert metrics.Progress('K=1', total=1).bar is None
