"""Tests of the learning-rate schedules and the injected-rate AdamW.

Expected values come from the schedule formulas written out with `math`, and
the first AdamW step from its closed form: bias-corrected m / sqrt(v) is
g / |g| at step one.
"""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ctsft_jax import optim


def _factor(step, total, *, warmup=0, schedule='constant', end=0.0):
  return float(
      optim.lr_factor(
          step, total, warmup_steps=warmup, schedule=schedule, end_factor=end
      )
  )


@pytest.mark.parametrize(
    'step, expected', [(0, 0.1), (4, 0.5), (8, 0.9), (9, 1.0), (50, 1.0)]
)
def test_linear_warmup_then_constant(step, expected):
  assert _factor(step, 100, warmup=10) == pytest.approx(expected)


def test_constant_without_warmup_is_one_everywhere():
  for step in (0, 1, 99, 100, 500):
    assert _factor(step, 100) == 1.0


def _cosine(step, total, warmup, end):
  progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
  return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))


def _linear(step, total, warmup, end):
  progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
  return 1 - (1 - end) * progress


@pytest.mark.parametrize('step', [10, 35, 60, 85, 110, 200])
def test_cosine_decay_after_warmup(step):
  expected = _cosine(step, 110, 10, 0.1)
  got = _factor(step, 110, warmup=10, schedule='cosine', end=0.1)
  assert got == pytest.approx(expected, abs=1e-6)


def test_cosine_hand_values():
  kwargs = dict(warmup=10, schedule='cosine', end=0.1)
  assert _factor(10, 110, **kwargs) == pytest.approx(1.0)
  assert _factor(60, 110, **kwargs) == pytest.approx(0.55)
  assert _factor(110, 110, **kwargs) == pytest.approx(0.1)
  # Warmup multiplies the decay: step 4 is 0.5 x (not yet decayed) 1.
  assert _factor(4, 110, **kwargs) == pytest.approx(0.5)


@pytest.mark.parametrize('step', [0, 35, 60, 110, 111])
def test_linear_decay(step):
  expected = _linear(step, 110, 10, 0.2) * min(1.0, (step + 1) / 10)
  got = _factor(step, 110, warmup=10, schedule='linear', end=0.2)
  assert got == pytest.approx(expected, abs=1e-6)
  assert _factor(35, 110, warmup=10, schedule='linear', end=0.2) == (
      pytest.approx(0.8)
  )


def test_decaying_schedule_depends_on_total_steps_constant_does_not():
  assert _factor(30, 60, schedule='cosine') != _factor(
      30, 120, schedule='cosine'
  )
  assert _factor(30, 60) == _factor(30, 120)
  for schedule, depends in (
      ('constant', False),
      ('cosine', True),
      ('linear', True),
  ):
    config = ml_collections.ConfigDict(dict(schedule=schedule))
    assert optim.depends_on_total_steps(config) is depends


def test_lr_factor_is_elementwise_over_lanes():
  got = optim.lr_factor(
      jnp.int32(30),
      jnp.asarray([60, 120]),
      warmup_steps=0,
      schedule='linear',
      end_factor=0.0,
  )
  np.testing.assert_allclose(got, [0.5, 0.75], rtol=1e-6)


def test_unknown_schedule_is_named():
  with pytest.raises(ValueError, match='bogus'):
    _factor(0, 10, schedule='bogus')


def _optim_config(**overrides):
  values = dict(weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=0.0)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def _one_step(config, params, grads, lr):
  optimizer = optim.make_optimizer(config)
  state = optim.with_learning_rate(optimizer.init(params), lr)
  updates, _ = optimizer.update(grads, state, params)
  return optax.apply_updates(params, updates)


def test_first_adamw_step_moves_each_weight_by_lr_times_sign():
  params = {'w': jnp.asarray([1.0, -2.0, 3.0])}
  grads = {'w': jnp.asarray([0.3, -0.2, 0.0])}
  new = _one_step(_optim_config(), params, grads, 0.1)
  # m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps): sign(g) where g != 0.
  np.testing.assert_allclose(new['w'], [0.9, -1.9, 3.0], rtol=1e-6)


def test_injected_learning_rate_and_weight_decay_take_effect():
  params = {'w': jnp.asarray([1.0, -2.0])}
  grads = {'w': jnp.asarray([0.5, 0.5])}
  slow = _one_step(_optim_config(), params, grads, 0.01)
  np.testing.assert_allclose(slow['w'], [0.99, -2.01], rtol=1e-6)
  decayed = _one_step(_optim_config(weight_decay=0.5), params, grads, 0.01)
  # Decoupled decay: w - lr * (sign(g) + wd * w).
  np.testing.assert_allclose(
      decayed['w'], [1 - 0.01 * (1 + 0.5), -2 - 0.01 * (1 - 1.0)], rtol=1e-6
  )


def test_global_norm_clipping_bounds_the_gradient_seen_by_adam():
  """Clipping rescales g before Adam; at step one Adam's step is sign(g)
  either way, so compare the second step, where the moments mix."""
  params = {'w': jnp.asarray([0.0, 0.0])}
  big = {'w': jnp.asarray([300.0, 400.0])}  # norm 500
  small = {'w': jnp.asarray([0.03, 0.04])}  # norm 0.05
  results = {}
  for clip in (0.0, 1.0):
    optimizer = optim.make_optimizer(_optim_config(max_grad_norm=clip))
    state = optim.with_learning_rate(optimizer.init(params), 0.1)
    p = params
    for grads in (big, small):
      updates, state = optimizer.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    results[clip] = np.asarray(p['w'])
  assert not np.allclose(results[0.0], results[1.0])
  # Second-step Adam update by hand, with g1 clipped to norm 1 or not.
  for clip, scale in ((0.0, 1.0), (1.0, 1 / 500)):
    g1 = np.array([300.0, 400.0]) * scale
    g2 = np.array([0.03, 0.04])  # norm 0.05: never clipped
    m = 0.9 * 0.1 * g1 + 0.1 * g2
    v = 0.999 * 0.001 * g1**2 + 0.001 * g2**2
    m_hat, v_hat = m / (1 - 0.9**2), v / (1 - 0.999**2)
    step2 = m_hat / (np.sqrt(v_hat) + 1e-8)
    expected = -0.1 * np.sign(g1) - 0.1 * step2
    np.testing.assert_allclose(results[clip], expected, rtol=1e-5)
