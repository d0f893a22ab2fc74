"""Tests of the compiled trainer: losses, lanes, compiles and divergence.

Losses are checked against a numpy log-softmax; lanes against the same seed
trained alone; isolation against the same program run without the fault.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctsft_jax import data as data_lib
from ctsft_jax import model as model_lib
from ctsft_jax import train as train_lib

LR = 1e-2  # peak learning rate of the healthy lanes


def _to_device(split, pad_to=1):
  arrays = train_lib.DataArrays(
      *(jnp.asarray(x) for x in (split.inputs, split.targets, split.weights))
  )
  return train_lib.pad_rows(arrays, pad_to)


@pytest.fixture(scope='module')
def tiny(make_config, make_base):
  """A tiny config, random base and the synthetic task's splits."""
  config = make_config()
  dataset = data_lib.load_sft(config.data, cache_dir=None)
  return dict(
      config=config,
      base=make_base(config.model),
      train=_to_device(dataset.train),
      eval=_to_device(dataset.eval, config.train.eval_batch),
  )


def _compile(tiny, rank, n_lanes, chunk_steps, shared=False):
  config = tiny['config']
  return train_lib.compile_programs(
      train_lib.lowrank_task(config, rank),
      optim_config=config.optim,
      batch_size=config.data.batch_size,
      eval_batch=config.train.eval_batch,
      n_lanes=n_lanes,
      chunk_steps=chunk_steps,
      frozen=tiny['base'],
      train=tiny['train'],
      eval_data=tiny['eval'],
      shared_data=shared,
  )


@pytest.fixture(scope='module')
def programs(tiny):
  """`programs(rank, n_lanes, chunk_steps, shared=False)`, compiled once."""
  return functools.cache(functools.partial(_compile, tiny))


def _init(progs, seeds, peak_lr=LR, total_steps=1000):
  init_keys, data_keys = train_lib.lane_keys(seeds)
  n = len(seeds)
  state = progs.init(
      init_keys,
      jnp.asarray(np.broadcast_to(peak_lr, (n,)), jnp.float32),
      jnp.asarray(np.broadcast_to(total_steps, (n,)), jnp.int32),
  )
  return state, data_keys


def _host(tree):
  return jax.tree.map(np.array, tree)


def _lane(tree, i):
  return jax.tree.map(lambda x: np.asarray(x)[i], tree)


def _np_cross_entropy(logits, targets, weights):
  """Weighted mean of -log softmax(logits)[target], in float64."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return -(picked * weights).sum() / weights.sum()


def test_weighted_cross_entropy_counts_response_positions_only():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5)).astype(np.int32)
  weights = np.array(
      [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32
  )  # prompt, response, padding
  loss = float(train_lib.weighted_cross_entropy(logits, targets, weights))
  assert loss == pytest.approx(
      _np_cross_entropy(logits, targets, weights), rel=1e-6
  )
  # A weight-0 position cannot move the loss, whatever it holds.
  logits2, targets2 = logits.copy(), targets.copy()
  logits2[0, 0] += 50.0
  logits2[1, 4] = -logits2[1, 4]
  targets2[0, 1] = (targets2[0, 1] + 1) % 7
  loss2 = float(train_lib.weighted_cross_entropy(logits2, targets2, weights))
  assert loss2 == loss
  # A weight-1 position does.
  targets2[0, 2] = (targets2[0, 2] + 1) % 7
  loss3 = float(train_lib.weighted_cross_entropy(logits2, targets2, weights))
  assert loss3 != loss


def test_task_loss_is_numpy_cross_entropy_of_model_logits(tiny, make_factors):
  config, base = tiny['config'], tiny['base']
  task = train_lib.lowrank_task(config, 2)
  factors = make_factors(config.model, 2, config.lowrank.targets)
  batch = train_lib.DataArrays(*(x[:3] for x in tiny['train']))
  loss = jax.jit(task.loss)(factors, base, batch)
  logits = jax.jit(model_lib.build(config.model).apply)(
      {'params': base}, batch.inputs
  )
  expected = _np_cross_entropy(
      logits, np.asarray(batch.targets), np.asarray(batch.weights)
  )
  assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_evaluate_is_one_mean_over_all_response_tokens(tiny, programs):
  progs = programs(1, 2, 4)
  state, data_keys = _init(progs, (0, 1))
  state, _ = train_lib.advance(
      progs, state, tiny['base'], tiny['train'], data_keys, 4
  )
  got = np.asarray(progs.evaluate(state.params, tiny['base'], tiny['eval']))
  config = tiny['config']
  module = model_lib.build(
      config.model,
      1,
      scaling_rule=config.lowrank.scaling,
      alpha=config.lowrank.alpha,
      targets=tuple(config.lowrank.targets),
  )
  data = _host(tiny['eval'])
  for lane in range(2):
    logits = jax.jit(module.apply)(
        {'params': tiny['base'], model_lib.LOWRANK: _lane(state.params, lane)},
        data.inputs,
    )
    expected = _np_cross_entropy(logits, data.targets, data.weights)
    assert got[lane] == pytest.approx(expected, rel=1e-5)
  assert got[0] != got[1]


def test_training_leaves_base_bitwise_unchanged_and_moves_factors(
    tiny, programs
):
  progs = programs(1, 2, 4)
  base_before = _host(tiny['base'])
  state, data_keys = _init(progs, (0, 1))
  factors_before = _host(state.params)
  state, _ = train_lib.advance(
      progs, state, tiny['base'], tiny['train'], data_keys, 8
  )
  jax.tree.map(np.testing.assert_array_equal, _host(tiny['base']), base_before)
  moved = jax.tree.map(
      lambda a, b: not np.array_equal(a, b), _host(state.params), factors_before
  )
  assert all(jax.tree.leaves(moved)), moved
  assert int(state.step) == 8


def test_a_vmapped_lane_equals_the_same_seed_trained_alone(tiny, programs):
  """Seed 1 as lane 1 of two (chunks of 4) and alone (chunks of 5)."""
  together = programs(1, 2, 4)
  alone = programs(1, 1, 5)
  state2, keys2 = _init(together, (0, 1))
  state1, keys1 = _init(alone, (1,))
  state2, losses2 = train_lib.advance(
      together, state2, tiny['base'], tiny['train'], keys2, 12
  )
  state1, losses1 = train_lib.advance(
      alone, state1, tiny['base'], tiny['train'], keys1, 12
  )
  np.testing.assert_allclose(losses2[:, 1], losses1[:, 0], rtol=1e-5)
  jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
      _lane(state2.params, 1),
      _lane(state1.params, 0),
  )
  assert not np.allclose(losses2[:, 0], losses2[:, 1])


def test_lanes_differ_in_init_and_data_unless_data_is_shared(tiny, programs):
  own = programs(1, 2, 4)
  shared = programs(1, 2, 4, shared=True)
  state, keys = _init(own, (0, 1))
  a = state.params['head']['a']
  assert not np.array_equal(a[0], a[1])
  _, own_losses = train_lib.advance(
      own, state, tiny['base'], tiny['train'], keys, 4
  )
  state, keys = _init(shared, (0, 1))
  _, shared_losses = train_lib.advance(
      shared, state, tiny['base'], tiny['train'], keys[0], 4
  )
  # Step 0 runs the untuned base (B = 0) on each lane's batch.
  assert own_losses[0, 0] != own_losses[0, 1]
  assert shared_losses[0, 0] == pytest.approx(shared_losses[0, 1], rel=1e-6)
  # The shared stream is lane 0's own stream.
  np.testing.assert_allclose(shared_losses[:, 0], own_losses[:, 0], rtol=1e-5)


def test_seed_sees_the_same_batches_for_every_k(tiny, programs):
  losses = {}
  for rank in (1, 2):
    progs = programs(rank, 2, 4)
    state, keys = _init(progs, (0, 1))
    _, losses[rank] = train_lib.advance(
        progs, state, tiny['base'], tiny['train'], keys, 4
    )
  # At step 0 both K run the base on the batch of step 0: same batch, same
  # loss; afterwards the factors differ.
  np.testing.assert_allclose(losses[1][0], losses[2][0], rtol=1e-6)
  assert not np.allclose(losses[1][1:], losses[2][1:])


def test_one_compile_per_k_and_no_recompiles(tiny, compile_counter):
  init_keys, data_keys = train_lib.lane_keys((0, 1))
  peak_lr = jnp.full((2,), LR, jnp.float32)
  total = jnp.full((2,), 100, jnp.int32)
  compile_counter.names.clear()
  progs = _compile(tiny, 2, 2, 4)
  # init, the train chunk and evaluation: one program each.
  assert compile_counter.count == 3, compile_counter.names
  state = progs.init(init_keys, peak_lr, total)
  for n in (4, 3, 1, 6):
    state, _ = train_lib.advance(
        progs, state, tiny['base'], tiny['train'], data_keys, n
    )
    progs.evaluate(state.params, tiny['base'], tiny['eval'])
  assert int(state.step) == 14
  assert compile_counter.count == 3, compile_counter.names
  # Host copies of the state are accepted as they are; three lanes (built on
  # the host, so that building them compiles nothing) are refused.
  host = _host(state)
  state, _ = progs.train_chunk(
      host, tiny['base'], tiny['train'], data_keys, np.int32(2)
  )
  assert int(state.step) == 16
  wider = jax.tree.map(
      lambda x: np.concatenate([x, x[:1]]) if x.ndim else x, host
  )
  with pytest.raises((TypeError, ValueError)):
    progs.train_chunk(
        wider, tiny['base'], tiny['train'], data_keys, np.int32(4)
    )
  assert compile_counter.count == 3, compile_counter.names


def test_loss_decreases_on_the_synthetic_task(tiny, programs):
  progs = programs(1, 2, 4)
  state, keys = _init(progs, (0, 1))
  _, losses = train_lib.advance(
      progs, state, tiny['base'], tiny['train'], keys, 300
  )
  first, last = losses[:20].mean(axis=0), losses[-20:].mean(axis=0)
  assert np.all(last < 0.8 * first), (first, last)


def test_a_lane_stops_at_its_own_total_steps(tiny, programs):
  progs = programs(1, 2, 4)
  state, keys = _init(progs, (0, 1), total_steps=(3, 8))
  state, _ = train_lib.advance(
      progs, state, tiny['base'], tiny['train'], keys, 8
  )
  reference, keys = _init(progs, (0, 1))
  reference, _ = train_lib.advance(
      progs, reference, tiny['base'], tiny['train'], keys, 3
  )
  jax.tree.map(
      np.testing.assert_array_equal,
      _lane(state.params, 0),
      _lane(reference.params, 0),
  )
  assert not np.array_equal(
      _lane(state.params, 1)['head']['b'],
      _lane(reference.params, 1)['head']['b'],
  )
  np.testing.assert_array_equal(state.status, [train_lib.OK, train_lib.OK])


def _train(tiny, progs, state, keys, steps=8):
  return train_lib.advance(
      progs, state, tiny['base'], tiny['train'], keys, steps
  )


def test_huge_learning_rate_diverges_one_lane_only(tiny, programs):
  progs = programs(1, 2, 4)
  healthy, keys = _init(progs, (0, 1))
  healthy, healthy_losses = _train(tiny, progs, healthy, keys)
  bad, keys = _init(progs, (0, 1), peak_lr=(LR, 1e30))
  bad, bad_losses = _train(tiny, progs, bad, keys)
  np.testing.assert_array_equal(bad.status, [train_lib.OK, train_lib.DIVERGED])
  diverged_step = int(bad.diverged_step[1])
  assert 0 <= diverged_step < 8
  assert int(bad.diverged_step[0]) == -1
  assert not np.isfinite(bad_losses[diverged_step, 1])
  for leaf in jax.tree.leaves(_lane(bad.params, 1)):
    assert np.all(np.isfinite(leaf))
  assert np.isfinite(bad.last_loss[1])
  # The healthy lane is bitwise what it is without the bad neighbour.
  jax.tree.map(
      np.testing.assert_array_equal,
      _lane(bad.params, 0),
      _lane(healthy.params, 0),
  )
  np.testing.assert_array_equal(bad_losses[:, 0], healthy_losses[:, 0])


def test_nan_factors_diverge_at_step_zero_and_are_held(tiny, programs):
  progs = programs(1, 2, 4)
  healthy, keys = _init(progs, (0, 1))
  healthy, _ = _train(tiny, progs, healthy, keys)
  bad, keys = _init(progs, (0, 1))
  poisoned = jax.tree.map(lambda x: x.at[1].set(jnp.nan), bad.params)
  bad = bad._replace(params=poisoned)
  before = _host(_lane(bad.opt_state.inner_state, 1))
  bad, _ = _train(tiny, progs, bad, keys)
  np.testing.assert_array_equal(bad.status, [train_lib.OK, train_lib.DIVERGED])
  assert int(bad.diverged_step[1]) == 0
  # Held: the Adam moments and step counts of the bad lane did not move.
  jax.tree.map(
      np.testing.assert_array_equal,
      _lane(bad.opt_state.inner_state, 1),
      before,
  )
  jax.tree.map(
      np.testing.assert_array_equal,
      _lane(bad.params, 0),
      _lane(healthy.params, 0),
  )
