"""Tests of the factor tree: which layers get factors, their init and count.

Parameter counts are checked against sum over targets of K * (d_in + d_out),
written out here from the config dims, not taken from the module.
"""

import flax
import jax
import numpy as np
import pytest

from ctsft_jax import lowrank

ALL_TARGETS = (
    '*/attn/q',
    '*/attn/k',
    '*/attn/v',
    '*/attn/o',
    '*/mlp/up',
    '*/mlp/down',
    'head',
)


def _paths(model_config, targets, rank=1):
  shapes = lowrank.factor_shapes(model_config, rank, targets)
  return sorted(flax.traverse_util.flatten_dict(shapes, sep='/'))


def _hand_count(model_config, rank, targets=ALL_TARGETS):
  """sum over targets of K * (d_in + d_out), from the dims by hand."""
  d, d_mlp, vocab = (
      model_config.d_model,
      model_config.d_mlp,
      model_config.vocab_size,
  )
  per_layer = {
      '*/attn/q': d + d,
      '*/attn/k': d + d,
      '*/attn/v': d + d,
      '*/attn/o': d + d,
      '*/mlp/up': d + d_mlp,
      '*/mlp/down': d_mlp + d,
  }
  total = sum(per_layer[t] for t in targets if t in per_layer)
  total *= model_config.n_layers
  if 'head' in targets:
    total += d + vocab
  return rank * total


def test_head_only_gives_exactly_one_factor_pair(make_config):
  config = make_config()
  assert _paths(config.model, ('head',)) == ['head/a', 'head/b']


def test_patterns_match_per_layer_paths(make_config):
  config = make_config(model__n_layers=2)
  assert _paths(config.model, ('*/attn/q',)) == [
      'block_0/attn/q/a',
      'block_0/attn/q/b',
      'block_1/attn/q/a',
      'block_1/attn/q/b',
  ]
  assert _paths(config.model, ('block_1/mlp/*',)) == [
      'block_1/mlp/down/a',
      'block_1/mlp/down/b',
      'block_1/mlp/up/a',
      'block_1/mlp/up/b',
  ]


def test_all_targets_cover_every_dense_but_not_embeddings(make_config):
  config = make_config()
  layers = {p.rsplit('/', 1)[0] for p in _paths(config.model, ALL_TARGETS)}
  assert layers == {
      'block_0/attn/q',
      'block_0/attn/k',
      'block_0/attn/v',
      'block_0/attn/o',
      'block_0/mlp/up',
      'block_0/mlp/down',
      'head',
  }


def test_no_matching_target_gives_empty_tree_and_max_rank_error(make_config):
  config = make_config()
  assert _paths(config.model, ('nothing/*',)) == []
  with pytest.raises(ValueError, match='nothing'):
    lowrank.max_rank(config.model, ('nothing/*',))


def test_factor_shapes_are_k_by_d_in_and_k_by_d_out(make_config):
  config = make_config()
  shapes = lowrank.factor_shapes(config.model, 3, ALL_TARGETS)
  d, d_mlp = config.model.d_model, config.model.d_mlp
  up = shapes['block_0']['mlp']['up']
  down = shapes['block_0']['mlp']['down']
  assert up['a'].shape == (3, d) and up['b'].shape == (3, d_mlp)
  assert down['a'].shape == (3, d_mlp) and down['b'].shape == (3, d)
  head = shapes['head']
  assert head['b'].shape == (3, config.model.vocab_size)
  assert lowrank.target_dims(shapes)['block_0/mlp/down'] == (d_mlp, d)


@pytest.mark.parametrize('n_layers', [1, 2])
def test_trainable_params_equal_hand_count_and_are_linear_in_k(
    make_config, n_layers
):
  config = make_config(model__n_layers=n_layers)
  counts = {
      k: lowrank.trainable_params(
          lowrank.factor_shapes(config.model, k, ALL_TARGETS)
      )
      for k in (1, 2, 3, 8)
  }
  for k, count in counts.items():
    assert count == k * counts[1]
    assert count == _hand_count(config.model, k)
  # d=16, d_mlp=32, vocab=260: per layer 4*32 + 48 + 48, head 276.
  assert counts[1] == 224 * n_layers + 276


def test_trainable_params_of_a_subset_of_targets(make_config):
  config = make_config(model__n_layers=2)
  targets = ('*/attn/q', '*/mlp/down')
  count = lowrank.trainable_params(
      lowrank.factor_shapes(config.model, 2, targets)
  )
  assert count == _hand_count(config.model, 2, targets)


def test_max_rank_is_smallest_side_of_targets(make_config):
  config = make_config()
  assert lowrank.max_rank(config.model, ALL_TARGETS) == 16
  assert lowrank.max_rank(config.model, ('head',)) == 16
  wide = make_config(model__d_model=32, model__n_heads=2)
  assert lowrank.max_rank(wide.model, ('*/mlp/up',)) == 32


def test_init_factors_b_zero_a_scaled_by_fan_in(make_config, make_factors):
  config = make_config(model__d_mlp=32)
  factors = make_factors(config.model, 16, ALL_TARGETS)
  flat = flax.traverse_util.flatten_dict(factors, sep='/')
  for path, value in flat.items():
    value = np.asarray(value)
    if path.endswith('/b'):
      assert not value.any(), path
    else:
      # std 1/sqrt(d_in): d_in * var(A) is 1 up to sampling error.
      assert value.shape[1] * value.var() == pytest.approx(1.0, abs=0.35)
      assert abs(value.mean()) < 0.1


def test_a_of_a_target_does_not_depend_on_other_targets(make_config):
  config = make_config()
  key = jax.random.key(3)
  one = lowrank.init_factors(
      lowrank.factor_shapes(config.model, 2, ('head',)), key
  )
  two = lowrank.init_factors(
      lowrank.factor_shapes(config.model, 2, ('*/attn/q', 'head')), key
  )
  np.testing.assert_array_equal(one['head']['a'], two['head']['a'])
  other = lowrank.init_factors(
      lowrank.factor_shapes(config.model, 2, ('head',)), jax.random.key(4)
  )
  assert not np.array_equal(one['head']['a'], other['head']['a'])
  # Distinct targets of the same shape draw distinct values.
  q_a, head_a = two['block_0']['attn']['q']['a'], one['head']['a']
  assert q_a.shape == head_a.shape
  assert not np.array_equal(q_a, head_a)
