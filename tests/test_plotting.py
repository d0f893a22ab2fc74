"""Tests of ctsft_jax.plotting: figures from a saved results.json alone."""

import copy
import json
import math
import os

from matplotlib import image
import numpy as np
import pytest

from ctsft_jax import analysis
from ctsft_jax import plotting

DATA = os.path.join(os.path.dirname(__file__), 'data', 'results_smoke.json')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def smoke():
  with open(DATA) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def drawn(smoke, tmp_path_factory):
  outdir = tmp_path_factory.mktemp('figures')
  return plotting.draw_all(copy.deepcopy(smoke), str(outdir))


def assert_real_png(path):
  """A PNG that decodes to a picture with something drawn on it."""
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_MAGIC, path
  pixels = image.imread(path)[..., :3]
  assert pixels.shape[0] > 200 and pixels.shape[1] > 300, pixels.shape
  inked = (pixels < 0.9).any(axis=-1).mean()
  assert 0.01 < inked < 0.9, (path, inked)
  colored = np.ptp(pixels, axis=-1) > 0.2  # not a shade of gray
  assert colored.mean() > 0.001, path


def test_draw_all_draws_every_figure_of_a_full_sweep(drawn):
  assert set(drawn) == set(plotting.FIGURES)
  for name, path in drawn.items():
    assert os.path.basename(path) == f'{name}.png'
    assert_real_png(path)


def test_only_the_figures_with_data_are_drawn(smoke, tmp_path):
  results = copy.deepcopy(smoke)
  results['cells'] = [
      c for c in results['cells'] if c['study'] == 'budget_matched'
  ]
  del results['analysis'], results['curves']
  drawn = plotting.draw_all(results, str(tmp_path))
  # With no flops or wall-clock cells and no analysis, only the curve and
  # the param-steps panel of the axes figure have data.
  assert set(drawn) == {'loss_vs_k', 'loss_vs_k_axes'}
  assert sorted(os.listdir(tmp_path)) == ['loss_vs_k.png', 'loss_vs_k_axes.png']
  results['cells'] = []
  assert plotting.draw_all(results, str(tmp_path / 'empty')) == {}


def test_smooth_matches_a_plain_loop():
  rng = np.random.default_rng(0)
  values = rng.normal(size=300)
  values[[3, 50, 51]] = np.nan
  got = plotting.smooth(values, share=0.1)
  for t in (1, 2, 9, 10, 52, 150, 300):
    width = max(1, round(0.1 * t))
    window = values[t - width : t]
    assert got[t - 1] == pytest.approx(np.nanmean(window)), t
  assert math.isnan(plotting.smooth([np.nan, 1.0])[0])


def test_curves_average_the_seeds_at_the_ks_chosen_rate():
  # Two seeds x two rates, seed-major: lane = seed * 2 + rate index.
  lanes = [{'seed': s, 'lr': lr} for s in (0, 1) for lr in (0.1, 0.3)]
  rows = [[1.0, 10.0, 3.0, 30.0], [2.0, 20.0, None, 40.0]]
  results = {
      'lanes': lanes,
      'curves': {'2': rows},
      'cells': [
          {'study': 'budget_matched', 'K': 2, 'lr': 0.3},
          {'study': 'crossover', 'K': 2, 'lr': 0.3},
          {'study': 'budget_multipliers', 'K': 2, 'lr': 0.1},
      ],
  }
  np.testing.assert_allclose(plotting.seed_mean_curve(results, 2), [20.0, 30.0])
  results['cells'][0]['lr'] = results['cells'][1]['lr'] = 0.1
  np.testing.assert_allclose(plotting.seed_mean_curve(results, 2), [2.0, 2.0])
  del results['lanes']
  np.testing.assert_allclose(
      plotting.seed_mean_curve(results, 2), [11.0, 62 / 3]
  )


def test_crossover_rows_pair_each_seed(smoke):
  by_key = {
      (c['pair'], c['K']): np.array(c['final_eval_loss'])
      for c in smoke['cells']
      if c['study'] == 'crossover'
  }
  rows = plotting.crossover_rows(smoke)
  assert [r['pair'] for r in rows] == [5, 10, 20, 40, 80]
  for row in rows:
    high, low = by_key[(row['pair'], 32)], by_key[(row['pair'], 2)]
    assert row['diff']['mean_diff'] == pytest.approx(np.mean(high - low))
    assert row['high'][0] == pytest.approx(high.mean())
    assert row['param_steps'] == 39_808 * row['pair']


def test_rule_rows_put_every_axis_in_anchor_units(smoke):
  rows = plotting.rule_rows(smoke)
  labels = [label for label, _, _ in rows]
  assert labels[-1] == 'paper 82 (param-steps)'
  paper = rows[-1][1]
  assert [k for _, _, k in paper] == [8, 32, 64, 2]
  assert paper[0][1] == pytest.approx(30e6 / analysis.PAPER_ANCHOR_PARAM_STEPS)
  assert paper[-1][1] == math.inf
  anchors = plotting.axis_anchors(smoke)
  flops = smoke['timing']['flops_per_step']['32'] * 40
  assert anchors['flops'] == pytest.approx(flops)
  _, _, measured = rows[labels.index('fitted, equal param-steps')]
  assert [round(x, 3) for x, _ in measured] == [0.125, 0.25, 0.5, 1.0, 2.0]
