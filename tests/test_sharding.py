"""Lanes split over several devices give the single-device results.

Runs in a subprocess with 4 forced CPU devices (XLA reads the device count
once, at start-up, so it cannot be changed inside the test process).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ctsft_jax import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from experiments.configs import paper82
    from ctsft_jax import errors, model, train

    config = paper82.get_config('smoke')
    config.unlock()
    config.model.update(d_model=16, d_mlp=32, n_heads=2, max_len=16)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (64, 16)).astype(np.int32)
    data = train.DataArrays(
        jnp.asarray(tokens), jnp.asarray(np.roll(tokens, -1, 1)),
        jnp.ones((64, 16), jnp.float32))
    base = model.init_base(config.model, jax.random.key(0))
    seeds = [0, 1, 2, 3]

    def run(devices):
      place = train.placement(len(seeds), devices)
      programs = train.compile_programs(
          train.lowrank_task(config, 2), optim_config=config.optim,
          batch_size=4, eval_batch=32, n_lanes=4, chunk_steps=5,
          frozen=place.put(base, lanes=False),
          train=place.put(data, lanes=False),
          eval_data=place.put(data, lanes=False), place=place)
      init_keys, data_keys = train.lane_keys(seeds)
      state = programs.init(*place.put(
          (init_keys, jnp.full((4,), 1e-2), jnp.full((4,), 12, jnp.int32)),
          lanes=True))
      state, losses = train.advance(
          programs, state, place.put(base, lanes=False),
          place.put(data, lanes=False), place.put(data_keys, lanes=True), 12)
      evals = programs.evaluate(
          state.params, place.put(base, lanes=False),
          place.put(data, lanes=False))
      leaf = jax.tree.leaves(state.params)[0]
      return dict(
          losses=losses.tolist(), evals=np.asarray(evals).tolist(),
          param_devices=len(leaf.sharding.device_set),
          shard_rows=[s.data.shape[0] for s in leaf.addressable_shards],
          eval_devices=len(evals.sharding.device_set),
          xla_flops=train.xla_flops_per_lane_step(
              programs.train_chunk, len(seeds), place))

    out = dict(n_devices=jax.device_count(), split=run(jax.devices()),
               single=run(jax.devices()[:1]))
    try:
      train.placement(6, jax.devices())
    except errors.UserError as e:
      out['uneven_error'] = str(e)
    print('RESULT' + json.dumps(out))
""")


def test_lanes_split_over_four_devices_match_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  proc = subprocess.run(
      [sys.executable, '-c', SCRIPT],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')][0]
  out = json.loads(line[len('RESULT') :])
  assert out['n_devices'] == 4
  split, single = out['split'], out['single']
  assert split['param_devices'] == 4 and split['eval_devices'] == 4
  assert split['shard_rows'] == [1, 1, 1, 1]  # one lane per device
  assert single['param_devices'] == 1
  np.testing.assert_allclose(split['losses'], single['losses'], rtol=1e-5)
  np.testing.assert_allclose(split['evals'], single['evals'], rtol=1e-5)
  assert len(set(single['evals'])) == 4  # the lanes really differ
  # Cost analysis of a split program counts one device's lanes; per lane
  # it is the single-device count.
  assert split['xla_flops'] == pytest.approx(single['xla_flops'], rel=0.02)
  assert '6 lanes' in out['uneven_error'] and '4 devices' in out['uneven_error']


@pytest.mark.parametrize(
    'requested, lanes, cores, expected',
    [
        (0, 4, 2, 2),  # one device per core
        (0, 3, 2, 1),  # 2 does not divide 3 lanes: one device
        (0, 1, 16, 1),  # never more devices than lanes
        (0, 12, 8, 6),  # the largest count <= cores that divides the lanes
        (0, 8, 16, 8),
        (3, 4, 2, 3),  # an explicit count is taken as it is
    ],
)
def test_cpu_device_count(requested, lanes, cores, expected):
  assert environment.cpu_device_count(requested, lanes, cores) == expected


SPLIT_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from experiments.configs import paper82
    from ctsft_jax import environment

    config = paper82.get_config('smoke')
    config.unlock()
    config.seeds, config.train.cpu_devices = int(sys.argv[1]), int(sys.argv[2])
    first = environment.split_cpu_host(config)
    devices = jax.device_count()  # JAX starts here
    config.train.cpu_devices = devices + 1
    again = environment.split_cpu_host(config)  # too late: the count stays
    print('RESULT' + json.dumps(dict(
        set=first, again=again, devices=devices, now=jax.device_count())))
""")


@pytest.mark.parametrize(
    'seeds, requested, xla_flags, expected',
    [
        (6, 3, '', 3),
        (1, 0, '', 1),
        (6, 3, '--xla_force_host_platform_device_count=2', 2),
    ],
)
def test_split_cpu_host_sets_the_device_count_before_jax_starts(
    seeds, requested, xla_flags, expected
):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags)
  proc = subprocess.run(
      [sys.executable, '-c', SPLIT_SCRIPT, str(seeds), str(requested)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
  )
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')][-1]
  out = json.loads(line[len('RESULT') :])
  assert out['devices'] == out['now'] == expected
  # XLA_FLAGS wins over the config; asking for another count after JAX
  # started changes nothing.
  assert out['set'] == (None if xla_flags else expected)
  assert out['again'] is None
