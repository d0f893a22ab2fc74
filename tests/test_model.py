"""Tests of the transformer and its low-rank Dense layers.

Expected values are computed here in float64 numpy from the parameter arrays
(x @ W + b + s * (x @ A) @ B), and the scaling rules from their formulas, never
by calling the module under test a second way.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctsft_jax import model as model_lib


def _tokens(config, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(
      rng.integers(0, config.model.vocab_size, (batch, config.data.seq_len)),
      jnp.int32,
  )


def _random_b(factors, seed=1):
  """The factor tree with every B drawn from N(0, 1): a tuned model."""
  flat = flax.traverse_util.flatten_dict(factors, sep='/')
  rng = np.random.default_rng(seed)
  out = {
      path: (
          jnp.asarray(rng.normal(size=x.shape), x.dtype)
          if path.endswith('/b')
          else x
      )
      for path, x in flat.items()
  }
  return flax.traverse_util.unflatten_dict(out, sep='/')


@pytest.fixture(scope='module')
def setup(make_config, make_base, make_factors):
  """`setup(config, rank, scaling_rule=...)` -> (base, factors, tuned model).

  The base and factors depend only on the parameter shapes, so they are made
  once per (shapes, K) and shared by the tests of this module.
  """
  cache = {}

  def make(config, rank, *, scaling_rule='standard', alpha=16.0):
    targets = tuple(config.lowrank.targets)
    dims = (config.model.d_model, config.model.d_mlp, config.model.n_layers)
    if (dims, rank) not in cache:
      cache[dims, rank] = (
          make_base(config.model),
          make_factors(config.model, rank, targets),
      )
    tuned = model_lib.build(
        config.model,
        rank,
        scaling_rule=scaling_rule,
        alpha=alpha,
        targets=targets,
    )
    return *cache[dims, rank], tuned

  return make


def _apply(module, variables, tokens, **kwargs):
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, tokens)


def test_zero_b_at_init_gives_the_base_logits_exactly(make_config, setup):
  config = make_config()
  tokens = _tokens(config)
  base, factors, tuned = setup(config, rank=2)
  base_logits = _apply(model_lib.build(config.model), {'params': base}, tokens)
  tuned_logits = _apply(
      tuned, {'params': base, model_lib.LOWRANK: factors}, tokens
  )
  np.testing.assert_array_equal(tuned_logits, base_logits)
  changed = _apply(
      tuned, {'params': base, model_lib.LOWRANK: _random_b(factors)}, tokens
  )
  assert np.max(np.abs(np.asarray(changed) - np.asarray(base_logits))) > 1e-3


def test_base_model_has_no_lowrank_collection(make_config):
  config = make_config()
  tokens = _tokens(config)
  module = model_lib.build(config.model)
  variables = jax.eval_shape(module.init, jax.random.key(0), tokens)
  assert set(variables) == {'params'}


@pytest.mark.parametrize(
    'rule, expected_scale',
    [('standard', 16.0 / 4), ('rslora', 16.0 / 2), ('none', 1.0)],
)
def test_head_layer_matches_numpy(make_config, setup, rule, expected_scale):
  """head(x) = x @ W + b + s(K) (x @ a.T) @ b with K=4, alpha=16."""
  config = make_config()
  tokens = _tokens(config)
  base, factors, tuned = setup(config, rank=4, scaling_rule=rule)
  factors = _random_b(factors)
  logits, state = _apply(
      tuned,
      {'params': base, model_lib.LOWRANK: factors},
      tokens,
      capture_intermediates=True,
      mutable=['intermediates'],
  )
  # The head's input is the final RMSNorm's output, captured by flax.
  x = np.asarray(state['intermediates']['norm_out']['__call__'][0], np.float64)
  w = np.asarray(base['head']['kernel'], np.float64)
  b = np.asarray(base['head']['bias'], np.float64)
  a_f = np.asarray(factors['head']['a'], np.float64)
  b_f = np.asarray(factors['head']['b'], np.float64)
  expected = x @ w + b + expected_scale * (x @ a_f.T) @ b_f
  np.testing.assert_allclose(logits, expected, rtol=2e-5, atol=2e-5)


class _OneDense(flax.linen.Module):
  """A parent that names its only Dense `head`, so targets can match it."""

  rank: int
  scale: float
  targets: tuple

  @flax.linen.compact
  def __call__(self, x):
    return model_lib.Dense(
        5, rank=self.rank, scale=self.scale, targets=self.targets, name='head'
    )(x)


def test_standalone_dense_matches_numpy():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7)), jnp.float32)
  layer = _OneDense(rank=2, scale=0.5, targets=('head',))
  variables = jax.eval_shape(layer.init, jax.random.key(0), x)
  assert variables[model_lib.LOWRANK]['head']['a'].shape == (2, 7)
  assert variables[model_lib.LOWRANK]['head']['b'].shape == (2, 5)
  rng = np.random.default_rng(1)
  params = {
      'head': {
          'kernel': rng.normal(size=(7, 5)).astype(np.float32),
          'bias': rng.normal(size=(5,)).astype(np.float32),
      }
  }
  factors = {
      'head': {
          'a': rng.normal(size=(2, 7)).astype(np.float32),
          'b': rng.normal(size=(2, 5)).astype(np.float32),
      }
  }
  got = _apply(layer, {'params': params, model_lib.LOWRANK: factors}, x)
  x64 = np.asarray(x, np.float64)
  p, f = params['head'], factors['head']
  expected = x64 @ p['kernel'] + p['bias'] + 0.5 * (x64 @ f['a'].T) @ f['b']
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_dense_not_matching_targets_gets_no_factors():
  x = jnp.ones((2, 7), jnp.float32)
  layer = _OneDense(rank=2, scale=1.0, targets=('*/attn/q',))
  variables = jax.eval_shape(layer.init, jax.random.key(0), x)
  assert model_lib.LOWRANK not in variables


@pytest.mark.parametrize(
    'rule, rank, alpha, expected',
    [
        ('standard', 4, 16.0, 4.0),
        ('standard', 1, 8.0, 8.0),
        ('rslora', 4, 16.0, 8.0),
        ('rslora', 16, 2.0, 0.5),
        ('none', 4, 16.0, 1.0),
    ],
)
def test_scaling_rules(rule, rank, alpha, expected):
  assert model_lib.scaling(rule, alpha, rank) == pytest.approx(expected)


def test_unknown_scaling_rule_is_named():
  with pytest.raises(ValueError, match='bogus'):
    model_lib.scaling('bogus', 1.0, 2)


def test_scaling_rule_changes_the_tuned_logits(make_config, setup):
  config = make_config()
  tokens = _tokens(config)
  logits = {}
  for rule in ('standard', 'rslora', 'none'):
    base, factors, tuned = setup(config, rank=4, scaling_rule=rule)
    variables = {'params': base, model_lib.LOWRANK: _random_b(factors)}
    logits[rule] = np.asarray(_apply(tuned, variables, tokens))
  assert not np.allclose(logits['standard'], logits['rslora'])
  assert not np.allclose(logits['standard'], logits['none'])


def test_bfloat16_changes_logits_but_returns_float32(make_config, setup):
  config = make_config(model__dtype='bfloat16')
  tokens = _tokens(config)
  base, factors, tuned = setup(config, rank=2)
  logits = _apply(tuned, {'params': base, model_lib.LOWRANK: factors}, tokens)
  assert logits.dtype == jnp.float32
  config32 = make_config()
  logits32 = _apply(model_lib.build(config32.model), {'params': base}, tokens)
  # Same parameters, lower precision: close but not identical.
  assert not np.array_equal(np.asarray(logits), np.asarray(logits32))
  np.testing.assert_allclose(logits, logits32, atol=0.1)


def _plain_delta(x, a, b):
  return (x @ a.T) @ b


@pytest.mark.parametrize('lanes', [None, 3])
def test_lowrank_delta_gradients_equal_autodiff_of_the_plain_product(lanes):
  """The custom backward pass gives autodiff's gradients, also under vmap."""
  rng = np.random.default_rng(0)
  lead = (lanes,) if lanes else ()
  x = jnp.asarray(rng.normal(size=lead + (2, 5, 7)), jnp.float32)
  a = jnp.asarray(rng.normal(size=lead + (3, 7)), jnp.float32)
  b = jnp.asarray(rng.normal(size=lead + (3, 4)), jnp.float32)
  g = jnp.asarray(rng.normal(size=lead + (2, 5, 4)), jnp.float32)

  def grads(delta):
    loss = lambda x, a, b, g: jnp.sum(jnp.sin(delta(x, a, b)) * g)
    grad = jax.grad(loss, argnums=(0, 1, 2))
    return (jax.vmap(grad) if lanes else grad)(x, a, b, g)

  got, want = grads(model_lib.lowrank_delta), grads(_plain_delta)
  for got_i, want_i in zip(got, want):
    assert got_i.shape == want_i.shape
    np.testing.assert_allclose(got_i, want_i, rtol=1e-5, atol=1e-5)


def test_einsum_attention_equals_jax_dot_product_attention(make_config):
  """The written-out causal attention matches jax.nn's on the whole model."""
  config = make_config()
  tokens = _tokens(config)
  logits = {}
  for impl in ('einsum', 'dot_product_attention'):
    config.model.attention = impl
    module = model_lib.build(config.model)
    base = module.init(jax.random.key(0), tokens)['params']
    logits[impl] = module.apply({'params': base}, tokens)
  np.testing.assert_allclose(
      logits['einsum'], logits['dot_product_attention'], rtol=1e-5, atol=1e-5
  )
  config.model.attention = 'flash'
  with pytest.raises(ValueError, match='model.attention'):
    model_lib.build(config.model).init(jax.random.key(0), tokens)


def test_factor_grad_autodiff_gives_the_custom_passes_loss_and_grads(
    make_config, setup
):
  """model.factor_grad only changes how the factor gradients are computed."""
  config = make_config()
  tokens = _tokens(config)
  base, factors, _ = setup(config, rank=4)
  factors = _random_b(factors)
  out = {}
  for impl in ('custom', 'autodiff'):
    config.model.factor_grad = impl
    module = model_lib.build(
        config.model, 4, alpha=16.0, targets=tuple(config.lowrank.targets)
    )

    def loss(f):
      variables = {'params': base, model_lib.LOWRANK: f}
      return jnp.mean(jnp.sin(module.apply(variables, tokens)))

    out[impl] = jax.value_and_grad(loss)(factors)
  (loss_c, grad_c), (loss_a, grad_a) = out['custom'], out['autodiff']
  np.testing.assert_allclose(loss_c, loss_a, rtol=1e-6)
  flat_c = flax.traverse_util.flatten_dict(grad_c, sep='/')
  flat_a = flax.traverse_util.flatten_dict(grad_a, sep='/')
  assert flat_c.keys() == flat_a.keys()
  for path in flat_c:
    assert np.abs(flat_a[path]).max() > 0, path  # every factor gets a grad
    np.testing.assert_allclose(
        flat_c[path], flat_a[path], rtol=1e-4, atol=1e-6, err_msg=path
    )
  config.model.factor_grad = 'fused'
  with pytest.raises(ValueError, match='model.factor_grad'):
    model_lib.build(config.model, 4).init(jax.random.key(0), tokens)
