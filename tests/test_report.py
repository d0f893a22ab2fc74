"""Tests of ctsft_jax.report on a real smoke sweep and on trimmed copies.

`data/results_smoke.json` is the results.json of a 2-seed smoke sweep with
every study (`experiments/configs/paper82.py:smoke`), its curves cut to the
first 400 steps and its `analysis` recomputed by the current
`analysis.analyze` (rerun that when the analysis's output changes).
"""

import copy
import json
import math
import os
import re

import numpy as np
import pytest

from ctsft_jax import analysis
from ctsft_jax import report

DATA = os.path.join(os.path.dirname(__file__), 'data', 'results_smoke.json')
SECTIONS = (
    '## Setup',
    '## Budget-Matched K Curve',
    '## Extended K=2 Study (Budget Multipliers)',
    '## K=32 vs K=2 Crossover',
    '## Three Budget Axes',
    '### Equal param-steps',
    '### Equal model FLOPs',
    '### Equal wall-clock seconds',
    '## Learning Rates',
    '## Fitted Loss Surface',
    '## K-Budget Rule (Derived)',
    '## Verdicts',
)
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def smoke():
  with open(DATA) as f:
    return json.load(f)


@pytest.fixture
def results(smoke):
  return copy.deepcopy(smoke)


def only_budget_matched(results):
  """The sweep as if only the budget-matched study had run."""
  results['cells'] = [
      c for c in results['cells'] if c['study'] == 'budget_matched'
  ]
  results['analysis'] = analysis.analyze(
      results['cells'],
      results['budget'],
      analysis.cost_per_step_of(results),
      n_boot=50,
      n_boot_fit=5,
  )
  return results


def section(text, title):
  """The body of one '## ' section of the report."""
  start = text.index(title)
  end = text.find('\n## ', start + len(title))
  return text[start : end if end >= 0 else None]


def table_row(text, first_cell):
  """The first markdown table row whose first cell is `first_cell`."""
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip('|').split('|')]
    if line.startswith('|') and cells[0] == first_cell:
      return cells
  raise AssertionError(f'no row starting with {first_cell!r}')


def hand_diff(a, b):
  """'+d [lo, hi]' of the paired difference, from the t formula directly."""
  d = np.array(a, dtype=float) - np.array(b, dtype=float)
  half = 12.706204736174707 * d.std(ddof=1) / math.sqrt(d.size)  # t_0.975,1
  return f'{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]'


def cell(results, study, rank, **extra):
  return next(
      c
      for c in results['cells']
      if c['study'] == study
      and c['K'] == rank
      and all(c.get(k) == v for k, v in extra.items())
  )


def test_every_section_renders_from_the_sample(results):
  text = report.markdown(results)
  positions = [text.index(title) for title in SECTIONS]
  assert positions == sorted(positions)
  assert 'not run' not in text
  assert len(results['seeds']) == 2 and 'Seeds: 2 (0..1)' in text


def test_tables_hold_paired_differences_computed_by_hand(results):
  text = report.markdown(results)
  anchor = cell(results, 'budget_matched', 32)['final_eval_loss']
  four = cell(results, 'budget_multipliers', 2, multiplier=4.0)
  row = table_row(section(text, '## Extended K=2'), '4x')
  assert row[1] == '2,560'
  assert row[3] == hand_diff(four['final_eval_loss'], anchor)
  high = cell(results, 'crossover', 32, pair=20)['final_eval_loss']
  low = cell(results, 'crossover', 2, pair=20)['final_eval_loss']
  row = table_row(section(text, '## K=32 vs K=2 Crossover'), '20')
  assert row[2] == '320' and row[4] == hand_diff(high, low)
  # Every K=32 loss is above K=2's in this sweep, each significantly.
  assert row[6] == 'No'
  flops = cell(results, 'flops_matched', 4)
  row = table_row(section(text, '### Equal model FLOPs'), '4')
  assert row[1] == str(flops['steps'])
  assert row[7] == hand_diff(flops['final_eval_loss'], anchor)


def test_axis_paragraph_states_this_sweeps_cost_ratios(results):
  text = section(report.markdown(results), '## Three Budget Axes')
  flops = results['timing']['flops_per_step']
  ratio = flops['64'] / flops['2']
  assert f'{ratio:.2f}x the FLOPs of K=2 per step' in text
  steps_2 = flops['32'] * 40 / flops['2']
  assert f'{steps_2:.0f} vs' in text
  xla = results['timing']['xla_flops_per_step']['64']
  row = table_row(text[text.index('Cost of one train step') :], '64')
  assert float(row[3]) == pytest.approx(xla / flops['64'], abs=1e-3)


def test_claim_5_is_reported_with_its_measured_trend(results):
  text = report.markdown(results)
  rule = section(text, '## K-Budget Rule (Derived)')
  assert 'Measured trend (decides claim 5)' in rule
  assert table_row(rule, 'K=2 vs K=32')[1] == '0.125x'
  row = table_row(
      section(text, '## Verdicts'), results['analysis']['verdicts'][4]['claim']
  )
  assert row[1] == '**inconclusive**' and row[2].startswith('slope of')
  assert "paper 82's hand-written rule" in rule.lower()


def test_a_changed_verdict_changes_the_table(results):
  claim = results['analysis']['verdicts'][4]['claim']
  before = table_row(report.markdown(results), claim)
  results['analysis']['verdicts'][4]['verdict'] = analysis.CONFIRMED
  results['analysis']['verdicts'][4]['n_seeds'] = 7
  after = table_row(report.markdown(results), claim)
  assert before[1] == '**inconclusive**' and after[1] == '**confirmed**'
  assert after[3] == '7' and before[3] == '2'


def test_tuned_learning_rates_list_each_cells_choice(results):
  fixed = section(report.markdown(results), '## Learning Rates')
  assert 'Fixed, not tuned' in fixed and '0.001' in fixed
  results['lr_tuned_per_cell'] = True
  results['learning_rates'] = [0.001, 0.003]
  target = cell(results, 'crossover', 32, pair=80)
  target['lr'] = 0.003
  target['lr_selection_loss'] = {'0.001': 2.9, '0.003': 2.8}
  tuned = section(report.markdown(results), '## Learning Rates')
  assert 'Tuned per cell over the grid 0.001, 0.003' in tuned
  rows = [r for r in tuned.splitlines() if r.startswith('| crossover | 32 |')]
  assert [r.split('|')[4].strip() for r in rows].count('0.003') == 1


def test_missing_studies_render_not_run(results):
  text = report.markdown(only_budget_matched(results))
  for title in SECTIONS:
    assert title in text
  assert 'not run' in section(text, '## Extended K=2')
  assert 'not run' in section(text, '## K=32 vs K=2 Crossover')
  assert 'not run' in section(text, '## Fitted Loss Surface')
  axes = section(text, '## Three Budget Axes')
  assert 'flops_matched not run' in axes and 'wallclock_matched not run' in axes
  assert 'outside the measured steps' in axes
  assert 'Measured trend of the best K with the budget: not run' in text
  verdicts = section(text, '## Verdicts')
  assert verdicts.count('**inconclusive**') >= 3


def test_results_without_analysis_timing_or_curves(results):
  for key in ('analysis', 'timing', 'curves', 'environment', 'setup'):
    del results[key]
  text = report.markdown(results)
  for title in SECTIONS:
    assert title in text
  assert 'Why the axes disagree' not in text
  assert section(text, '## Verdicts').strip().endswith('not run.')


def test_write_all_writes_and_links_every_artifact(results, tmp_path):
  paths = report.write_all(results, str(tmp_path))
  expected = {'results', 'report', 'loss_vs_k', 'loss_vs_k_axes'}
  expected |= {'learning_curves', 'crossover', 'fit_surface', 'rule'}
  assert set(paths) == expected
  for name, path in paths.items():
    assert os.path.getsize(path) > 0, name
    if path.endswith('.png'):
      with open(path, 'rb') as f:
        assert f.read(8) == PNG_MAGIC, name
  with open(paths['report']) as f:
    text = f.read()
  links = re.findall(r'!\[[^\]]*\]\(([^)]+)\)', text)
  assert sorted(links) == sorted(
      os.path.basename(p) for p in paths.values() if p.endswith('.png')
  )
  for link in links:
    assert os.path.isfile(tmp_path / link)
  with open(paths['results']) as f:
    assert json.load(f)['budget'] == results['budget']
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.tmp-')]


def test_formatters_handle_missing_numbers():
  x = [2.0, 2.5, 3.1]
  half = 4.302652729911275 * np.std(x, ddof=1) / math.sqrt(3)  # t_0.975,2
  assert report.fmt_ci(x + [None]) == f'{np.mean(x):.4f} ± {half:.4f}'
  assert report.fmt_ci([None, None]) == 'n/a'
  assert report.fmt_ci([1.5]) == '1.5000'
  assert report.fmt_diff({'mean_diff': None, 'ci95': [None, None]}) == 'n/a'
  assert report.fmt_diff({'mean_diff': -0.5, 'ci95': [None, None]}) == '-0.5000'
  assert report.fmt_budget(2.455e9) == '2.46G'
  assert report.fmt_budget(0.0685) == '0.0685'
