"""Writes a sweep's artifacts: results.json, report.md and the figures.

The report follows paper 82's layout (Setup, Budget-Matched K Curve,
Extended K=2, K=32 vs K=2 Crossover, K-Budget Rule) and adds what a rerun
with many seeds can say: means with 95% intervals, paired differences, the
same curve on three budget axes, the fitted loss surface and a verdict on
each of the paper's claims. It reads only the results dict (cells, timing
and the `analysis` section), so it can be rebuilt from results.json. A
section whose study did not run says so instead of failing.

Every file is written atomically (a temporary file, then a rename), so a
reader never sees a half-written result.
"""

import math
import os
from typing import Any, Mapping

from ctsft_jax import analysis
from ctsft_jax import checkpoint
from ctsft_jax import plotting

NOT_RUN = 'not run'
AXIS_TITLES = {
    'param_steps': "Equal param-steps (the paper's budget)",
    'flops': 'Equal model FLOPs',
    'wall_s': 'Equal wall-clock seconds',
}
AXIS_UNITS = {'param_steps': 'param-steps', 'flops': 'FLOPs', 'wall_s': 's'}


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def fmt_num(x, spec: str = '.4f') -> str:
  """`x` formatted with `spec`, or 'n/a' for None and non-finite values."""
  return format(x, spec) if _finite(x) else 'n/a'


def fmt_ci(values) -> str:
  """'mean ± half-width' of the 95% t interval over the finite values."""
  return fmt_summary(analysis.mean_ci(values))


def fmt_summary(summary: Mapping[str, Any] | None) -> str:
  """'mean ± half-width' of a {'mean', 'ci95'} dict (None entries allowed)."""
  if not summary or not _finite(summary.get('mean')):
    return 'n/a'
  lo, hi = summary.get('ci95') or (None, None)
  if not (_finite(lo) and _finite(hi)):
    return f"{summary['mean']:.4f}"
  return f"{summary['mean']:.4f} ± {(hi - lo) / 2:.4f}"


def fmt_diff(cmp: Mapping[str, Any] | None, key: str = 'mean_diff') -> str:
  """'+0.0210 [+0.0040, +0.0380]' of a paired comparison, or 'n/a'."""
  if not cmp or not _finite(cmp.get(key)):
    return 'n/a'
  lo, hi = cmp.get('ci95') or (None, None)
  if not (_finite(lo) and _finite(hi)):
    return f'{cmp[key]:+.4f}'
  return f'{cmp[key]:+.4f} [{lo:+.4f}, {hi:+.4f}]'


def fmt_budget(x) -> str:
  """A budget in engineering notation: 1.59M, 2.46G, 0.0685."""
  if not _finite(x):
    return 'n/a'
  scales = ((1e18, 'E'), (1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'))
  for scale, suffix in scales + ((1e3, 'k'),):
    if abs(x) >= scale:
      return f'{x / scale:.3g}{suffix}'
  return f'{x:.3g}'


def _table(header: list[str], rows: list[list]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += [
      '| ' + ' | '.join(str(c).replace('|', '\\|') for c in row) + ' |'
      for row in rows
  ]
  return '\n'.join(lines)


def _analysis(results: dict) -> dict:
  return results.get('analysis') or {}


def _metric(results: dict) -> str:
  return _analysis(results).get('metric', 'final_eval_loss')


def _metric_label(results: dict) -> str:
  """'eval loss' for final_eval_loss, and so on."""
  return _metric(results).removeprefix('final_').replace('_', ' ')


def _cells(results: dict, study: str) -> list[dict]:
  return [c for c in results.get('cells', []) if c['study'] == study]


def _anchor_values(results: dict):
  """Per-seed values of the anchor cell (anchor K at anchor steps) or None."""
  budget = results['budget']
  points = analysis.collect_points(results.get('cells', []), _metric(results))
  return points.get((budget['anchor_K'], budget['anchor_steps']))


def _vs_anchor(results: dict, cell: dict, anchor) -> str:
  """Paired difference of a cell against the anchor's values."""
  if cell['K'] == results['budget']['anchor_K'] and (
      cell['steps'] == results['budget']['anchor_steps']
  ):
    return '(anchor)'
  if anchor is None:
    return 'n/a'
  values = analysis.seed_values(cell, _metric(results))
  return fmt_diff(analysis.paired(values, anchor, n_boot=0))


def _figure(figures: Mapping[str, str] | None, name: str, alt: str) -> list:
  """A markdown image line for a drawn figure, by path relative to it."""
  if not figures or name not in figures:
    return []
  return ['', f'![{alt}]({os.path.basename(figures[name])})']


def setup_table(results: dict) -> str:
  rows = [
      [
          r['K'],
          f"{r['trainable_params']:,}",
          r['steps'],
          f"{r['param_steps']:,}",
      ]
      for r in results.get('setup', [])
  ]
  return _table(['K', 'Params', 'Steps', 'Total Param-Steps'], rows)


def _diverged_note(cell: dict) -> str:
  n = list(cell.get('status') or []).count('diverged')
  return f'{n} diverged' if n else ''


def budget_matched_table(results: dict) -> str:
  """The paper's table with 95% intervals and the paired gap to the anchor."""
  cells = sorted(_cells(results, 'budget_matched'), key=lambda c: c['K'])
  metric = _metric(results)
  means = {
      c['K']: analysis.mean_ci(analysis.seed_values(c, metric))['mean']
      for c in cells
  }
  finite = {k: m for k, m in means.items() if _finite(m)}
  best = min(finite, key=finite.get) if finite else None
  anchor_k = results['budget']['anchor_K']
  anchor = _anchor_values(results)
  rows = []
  for c in cells:
    note = ', '.join(
        n
        for n in ('lowest mean' if c['K'] == best else '', _diverged_note(c))
        if n
    )
    rows.append(
        [
            c['K'],
            c['steps'],
            fmt_ci(c['final_eval_loss']),
            fmt_ci(c['final_train_loss']),
            _vs_anchor(results, c, anchor),
            note,
        ]
    )
  return _table(
      [
          'K',
          'Steps',
          'Final eval loss',
          'Final train loss',
          f'vs K={anchor_k} (paired {_metric_label(results)})',
          'Note',
      ],
      rows,
  )


def _header(results: dict) -> list[str]:
  cfg, env = results.get('config', {}), results.get('environment', {})
  data, base = results.get('data', {}), results.get('base', {})
  budget, seeds = results['budget'], results.get('seeds', [])
  model, optim = cfg.get('model', {}), cfg.get('optim', {})
  lowrank = cfg.get('lowrank', {})
  lines = [
      '# K-budget sweep',
      '',
      f"Budget: {budget['param_steps']:,} param-steps (anchor"
      f" K={budget['anchor_K']} x {budget['anchor_steps']} steps). Seeds:"
      f' {len(seeds)}'
      + (f' ({seeds[0]}..{seeds[-1]})' if seeds else '')
      + '; losses are means ± the half-width of the 95% t interval over'
      ' seeds, differences are paired by seed (seed i sees the same data for'
      ' every K) with their 95% interval in brackets; per-seed values are in'
      ' results.json.',
      '',
      f"Data: {data.get('source')} ({data.get('n_train')} train /"
      f" {data.get('n_eval')} eval examples, sha256"
      f" {str(data.get('sha256'))[:12]}, Python {data.get('python_version')})."
      f" Base: {base.get('kind')}; untuned base eval loss"
      f" {fmt_num(results.get('base_eval_loss'))}.",
      '',
      f"Model: d_model={model.get('d_model')},"
      f" layers={model.get('n_layers')}, d_mlp={model.get('d_mlp')},"
      f" seq_len={cfg.get('data', {}).get('seq_len')}; scaling"
      f" {lowrank.get('scaling')} (alpha={lowrank.get('alpha')}); AdamW"
      f" ({optim.get('schedule')} schedule); learning rate"
      f" {'tuned per cell' if results.get('lr_tuned_per_cell') else 'fixed'}"
      ' (see Learning rates).',
  ]
  largest = max((r['K'] for r in results.get('setup', [])), default=None)
  if largest is not None and base.get('max_rank'):
    lines += [
        '',
        f'Largest K {largest} against min(d_in, d_out) of the targets'
        f" {base['max_rank']}: ratio {largest / base['max_rank']:.2f}.",
    ]
  if env:
    lines += [
        '',
        f"Ran on {env.get('backend')} ({env.get('device_count')} x"
        f" {env.get('device_kind')}), jax"
        f" {env.get('packages', {}).get('jax')}.",
    ]
  return lines


def budget_matched_section(results, figures) -> list[str]:
  lines = ['', '## Budget-Matched K Curve', '']
  if not _cells(results, 'budget_matched'):
    return lines + [NOT_RUN + '.']
  lines += [
      "Final eval loss is on the fixed held-out set at the cell's last step;"
      " final train loss is the mean over the cell's last tenth of steps.",
      '',
      budget_matched_table(results),
  ]
  lines += _figure(figures, 'loss_vs_k', 'loss vs K')
  lines += _figure(figures, 'learning_curves', 'learning curves')
  return lines


def multipliers_section(results) -> list[str]:
  budget = results['budget']
  anchor = f"K={budget['anchor_K']}×{budget['anchor_steps']}"
  lines = ['', '## Extended K=2 Study (Budget Multipliers)', '']
  rows = _analysis(results).get('multipliers')
  if not rows:
    return lines + [NOT_RUN + '.']
  table = [
      [
          f"{r['multiplier']:g}x" if _finite(r.get('multiplier')) else 'n/a',
          f"{r['steps']:,}",
          fmt_summary(r['loss']),
          fmt_diff(r['vs_anchor']),
          fmt_num(r['vs_anchor'].get('p'), '.2g'),
      ]
      for r in rows
  ]
  return lines + [
      f'K={rows[0]["K"]} at multiples of the budget, against the anchor'
      f' {anchor} (difference below zero: K={rows[0]["K"]} is better).',
      '',
      _table(
          ['Budget multiplier', 'Steps', 'Final loss', f'vs {anchor}', 'p'],
          table,
      ),
  ]


def _wins(row) -> str:
  lo, hi = row.get('ci95') or (None, None)
  if _finite(hi) and hi < 0:
    return 'Yes'
  if _finite(lo) and lo > 0:
    return 'No'
  if not _finite(row.get('diff')):
    return 'n/a'
  return 'tie (n.s.)'


def crossover_section(results, figures) -> list[str]:
  lines = ['', '## K=32 vs K=2 Crossover', '']
  cross = _analysis(results).get('crossover')
  if not cross:
    return lines + [NOT_RUN + '.']
  rows = []
  for r in cross['pairs']:
    k32 = {'mean': r['mean_K32'], 'ci95': r.get('ci95_K32')}
    k2 = {'mean': r['mean_K2'], 'ci95': r.get('ci95_K2')}
    rows.append(
        [
            r['steps_K32'],
            fmt_summary(k32),
            f"{r['steps_K2']:,}",
            fmt_summary(k2),
            fmt_diff(r, 'diff'),
            fmt_num(r.get('prob_K32_wins'), '.2f'),
            _wins(r),
        ]
    )
  lines += [
      'K=32 at s steps against K=2 at 16 s steps (equal param-steps).'
      ' Paired diff is L(K=32) - L(K=2); K=32 wins when its 95% interval is'
      ' below zero. P(K32 wins) is the bootstrap share of seed resamples'
      ' whose mean difference is below zero.',
      '',
      _table(
          [
              'K=32 Steps',
              'K=32 Loss',
              'K=2 Equiv Steps',
              'K=2 Loss',
              'Paired diff [95% CI]',
              'P(K32 wins)',
              'K=32 Wins?',
          ],
          rows,
      ),
      '',
      _first_win_line(cross),
  ]
  return lines + _figure(figures, 'crossover', 'K=32 vs K=2 crossover')


def _first_win_line(cross: Mapping[str, Any]) -> str:
  """The first winning K=32 step count and its bootstrap distribution."""
  boot = cross.get('first_win_bootstrap') or {}
  lo, hi = boot.get('ci95') or (None, None)
  first = cross.get('first_win_steps')
  text = (
      'First K=32 step count with a lower mean loss than K=2: '
      + (f's={first}' if first is not None else 'none in the measured range')
      + '.'
  )
  if lo is None:
    return text + (
        ' K=32 wins at no measured step count in'
        f" {fmt_num(100 * (boot.get('prob_never') or math.nan), '.0f')}% of"
        ' seed resamples.'
    )
  probs = ', '.join(
      f's={s}: {p:.2f}' for s, p in (boot.get('prob') or {}).items() if p
  )
  return text + (
      f' Bootstrap 95% interval over seed resamples: [s={lo},'
      f" {f's={hi}' if hi is not None else 'no win in range'}]; share of"
      f' resamples first winning at {probs}; never:'
      f" {fmt_num(boot.get('prob_never'), '.2f')}."
  )


def _seconds_per_step(results: dict) -> dict[int, float]:
  timing = results.get('timing') or {}
  seconds = (
      timing.get('seconds_per_step_calibrated')
      or timing.get('seconds_per_step_measured')
      or {}
  )
  return {int(k): v for k, v in seconds.items()}


def _axis_cells_table(results: dict, study: str) -> str:
  """The cells of one matched study: their cost on every axis and loss."""
  calibrated = _seconds_per_step(results)
  anchor_k = results['budget']['anchor_K']
  anchor = _anchor_values(results)
  rows = []
  for c in sorted(_cells(results, study), key=lambda c: c['K']):
    rows.append(
        [
            c['K'],
            c['steps'],
            fmt_budget(c.get('param_steps')),
            fmt_budget(c.get('flops')),
            fmt_num(calibrated.get(c['K'], math.nan) * c['steps'], '.3g'),
            fmt_num(c.get('wall_s'), '.3g'),
            fmt_ci(c[_metric(results)]),
            _vs_anchor(results, c, anchor),
        ]
    )
  return _table(
      [
          'K',
          'Steps',
          'Param-steps',
          'FLOPs',
          'Seconds (calibrated)',
          'Seconds (measured)',
          'Final loss',
          f'vs K={anchor_k} (paired)',
      ],
      rows,
  )


def _axis_curve_table(curve: Mapping[str, Any]) -> str:
  """The analysis's curve on one axis, interpolated where no cell sits."""
  rows = []
  for r in curve['points']:
    if not r.get('available'):
      source = 'outside the measured steps'
    elif r.get('interpolated'):
      lo, hi = r['bracket_steps']
      source = f'interpolated between {lo} and {hi} steps'
    else:
      source = 'measured'
    rows.append([r['K'], fmt_num(r['steps'], '.1f'), fmt_summary(r), source])
  return _table(['K', 'Steps', 'Final loss', 'Source'], rows)


def _anchor_steps_text(costs, anchor_k, anchor_steps, lo, hi) -> str:
  """The steps K=lo and K=hi get at the anchor budget on each axis."""
  parts = []
  for name, cost in costs.items():
    if all(k in cost for k in (lo, hi, anchor_k)):
      steps_lo = cost[anchor_k] * anchor_steps / cost[lo]
      steps_hi = cost[anchor_k] * anchor_steps / cost[hi]
      parts.append(
          f'{steps_lo:.0f} vs {steps_hi:.0f} steps on {name}'
          f' (ratio {steps_lo / steps_hi:.1f})'
      )
  return (
      f' At the anchor budget K={lo} and K={hi} get '
      + '; '.join(parts)
      + '. On FLOPs or time every K gets a similar number of steps, so'
      ' there the small K loses its large step advantage, and the ranking'
      " of the K's can change. The larger the base relative to the"
      ' factors, the closer these ratios get to 1.'
  )


def _axis_paragraph(results: dict) -> list[str]:
  """Why the axes disagree, with this sweep's numbers."""
  timing = results.get('timing') or {}
  flops = {int(k): v for k, v in (timing.get('flops_per_step') or {}).items()}
  seconds = _seconds_per_step(results)
  params = {
      c['K']: c['trainable_params']
      for c in results.get('cells', [])
      if 'trainable_params' in c
  }
  ranks = sorted(set(flops) & set(params))
  if len(ranks) < 2:
    return []
  lo, hi = ranks[0], ranks[-1]
  slope = (flops[hi] - flops[lo]) / (hi - lo)
  base = flops[lo] - slope * lo
  budget = results['budget']
  anchor_k, anchor_steps = budget['anchor_K'], budget['anchor_steps']
  text = (
      f'Why the axes disagree: param-steps charge K={hi}'
      f' {params[hi] / params[lo]:.1f}x as much per step as K={lo}, because'
      ' trainable params grow linearly with K. The compute of a step does'
      " not: the frozen base's forward and backward pass is paid at every K"
      f' (about {fmt_budget(base)} FLOPs per step here, the intercept of FLOPs'
      f' per step against K), and each unit of K adds only'
      f' {fmt_budget(slope)}. So K={hi} costs {flops[hi] / flops[lo]:.2f}x'
      f' the FLOPs of K={lo} per step'
  )
  if lo in seconds and hi in seconds:
    text += f' and {seconds[hi] / seconds[lo]:.2f}x the seconds'
  text += '.'
  if anchor_k in params and anchor_k in flops:
    costs = {'param-steps': params, 'FLOPs': flops, 'seconds': seconds}
    text += _anchor_steps_text(costs, anchor_k, anchor_steps, lo, hi)
  return ['', text]


def _timing_table(results: dict) -> list[str]:
  timing = results.get('timing') or {}
  flops = timing.get('flops_per_step') or {}
  if not flops:
    return []
  xla = timing.get('xla_flops_per_step') or {}
  calibrated = timing.get('seconds_per_step_calibrated') or {}
  measured = timing.get('seconds_per_step_measured') or {}
  compile_s = timing.get('compile_seconds') or {}
  rows = []
  for k in sorted(flops, key=int):
    ratio = xla.get(k) / flops[k] if _finite(xla.get(k)) else None
    rows.append(
        [
            k,
            fmt_budget(flops[k]),
            fmt_budget(xla.get(k)),
            fmt_num(ratio, '.3f'),
            fmt_num(calibrated.get(k), '.3g'),
            fmt_num(measured.get(k), '.3g'),
            fmt_num(compile_s.get(k), '.1f'),
        ]
    )
  return [
      '',
      'Cost of one train step of one seed. Analytic FLOPs count the model'
      ' (forward and backward); XLA FLOPs are what the compiler reports for'
      ' the compiled step. Calibrated seconds come from a timing run before'
      ' the sweep (the wall-clock budget uses them); measured seconds are'
      " the sweep's own training time per step.",
      '',
      _table(
          [
              'K',
              'FLOPs/step (analytic)',
              'FLOPs/step (XLA)',
              'XLA/analytic',
              's/step (calibrated)',
              's/step (measured)',
              'Compile s',
          ],
          rows,
      ),
  ]


def axes_section(results, figures) -> list[str]:
  lines = ['', '## Three Budget Axes']
  curves = _analysis(results).get('axes') or {}
  for axis, (_, study, _) in plotting.AXES.items():
    lines += ['', f'### {AXIS_TITLES[axis]}', '']
    if _cells(results, study):
      lines.append(_axis_cells_table(results, study))
    elif curves.get(axis):
      lines += [
          f'{study} {NOT_RUN}; the curve below is read off the other cells'
          f' at budget {fmt_budget(curves[axis]["budget"])}'
          f' {AXIS_UNITS[axis]}, interpolated in log(steps) within a K.',
          '',
          _axis_curve_table(curves[axis]),
      ]
    else:
      lines.append(NOT_RUN + '.')
  lines += _axis_paragraph(results)
  lines += _timing_table(results)
  return lines + _figure(figures, 'loss_vs_k_axes', 'loss vs K per axis')


def learning_rate_section(results) -> list[str]:
  lines = ['', '## Learning Rates', '']
  rates = results.get('learning_rates') or []
  cells = results.get('cells', [])
  if not results.get('lr_tuned_per_cell'):
    used = sorted({c['lr'] for c in cells if c.get('lr') is not None})
    rate = ', '.join(f'{r:g}' for r in (used or rates)) or 'n/a'
    return lines + [
        f'Fixed, not tuned: every cell trained with peak learning rate'
        f' {rate}. A K whose best rate differs from it is handicapped in'
        ' every comparison below.'
    ]
  rows = [
      [
          c['study'],
          c['K'],
          c['steps'],
          fmt_num(c.get('lr'), 'g'),
          ', '.join(
              f'{lr}: {fmt_num(v)}'
              for lr, v in (c.get('lr_selection_loss') or {}).items()
          ),
      ]
      for c in cells
  ]
  return lines + [
      'Tuned per cell over the grid'
      f" {', '.join(f'{r:g}' for r in rates)}: each cell reports, for every"
      ' seed, the lane trained at the rate whose mean loss over seeds on the'
      ' selection half of the eval set is lowest; its reported losses come'
      ' from the other half.',
      '',
      _table(
          ['Study', 'K', 'Steps', 'Chosen lr', 'Selection loss per lr'], rows
      ),
  ]


def fit_section(results, figures) -> list[str]:
  lines = ['', '## Fitted Loss Surface', '']
  fit = _analysis(results).get('fit')
  if not fit or not fit.get('chosen'):
    return lines + [
        f'{NOT_RUN}: a surface needs more cells than parameters, with K and'
        ' steps varied independently (the budget-matched cells alone keep'
        ' K x steps constant).'
    ]
  chosen = fit[fit['chosen']]
  params = [
      [
          name,
          fmt_num(p['value'], '.4g'),
          fmt_num(p['std'], '.3g'),
          f"[{fmt_num(p['ci95'][0], '.4g')}, {fmt_num(p['ci95'][1], '.4g')}]",
      ]
      for name, p in chosen['params'].items()
  ]
  forms = [
      [
          form + (' (chosen)' if form == fit['chosen'] else ''),
          f['formula'],
          len(f['params']),
          fmt_num(f['rmse_in_sample']),
          fmt_num(f['rmse_loo']),
      ]
      for form, f in fit.items()
      if form != 'chosen' and f
  ]
  lines += [
      f"Chosen form: **{fit['chosen']}**, L(K, S) = {chosen['formula']}"
      f" (S = steps), fitted to the seed-mean loss of {chosen['n_points']}"
      f" (K, steps) points. In-sample RMSE {fmt_num(chosen['rmse_in_sample'])},"
      f" leave-one-point-out RMSE {fmt_num(chosen['rmse_loo'])}. Std and"
      f" interval from {chosen['n_boot_refits']} refits on seed resamples.",
      '',
      _table(['Parameter', 'Value', 'Bootstrap std', 'Bootstrap 95%'], params),
      '',
      'Candidate forms; the one with the lowest held-out RMSE is chosen, and'
      ' the interaction form only when it beats the best two-term form by'
      f' more than {analysis.INTERACTION_MARGIN:.0%}.',
      '',
      _table(
          ['Form', 'Formula', 'Params', 'In-sample RMSE', 'Held-out RMSE'],
          forms,
      ),
  ]
  return lines + _figure(figures, 'fit_surface', 'fitted surface')


def _fitted_rule_table(rule, axis, anchor) -> list[str]:
  ranges = [r for r in rule.get('ranges', []) if r['axis'] == axis]
  if not ranges:
    return ['Fitted rule: no fit.']
  unit = AXIS_UNITS[axis]
  rows = [
      [
          f"{fmt_budget(r['budget_min'])} - {fmt_budget(r['budget_max'])}"
          f' {unit}',
          f"{fmt_num(r['budget_min'] / anchor, '.3g')}x -"
          f" {fmt_num(r['budget_max'] / anchor, '.3g')}x"
          if anchor
          else 'n/a',
          r['best_K'],
      ]
      for r in ranges
  ]
  crossovers = [
      f"K={c['from_K']} -> K={c['to_K']} at {fmt_budget(c['budget'])} {unit}"
      + (f" ({c['budget'] / anchor:.3g}x anchor)" if anchor else '')
      for c in rule.get('crossovers', [])
      if c['axis'] == axis
  ]
  agree = (rule.get('agreement_with_paper') or {}).get(axis)
  return [
      _table(['Budget', 'x anchor', 'Best K (fitted)'], rows),
      '',
      'Crossovers: '
      + ('; '.join(crossovers) or 'none in the range')
      + '.'
      + (
          f" Agrees with the paper's rule on {agree:.0%} of the budgets."
          if _finite(agree)
          else ''
      ),
  ]


def _measured_rule_table(rule, axis, anchor) -> list[str]:
  measured = [m for m in rule.get('measured', []) if m['axis'] == axis]
  if not measured:
    return ["Measured: no budget on this axis has two K's."]
  rows = []
  for m in measured:
    cmp = m['best_vs_runner_up']
    ranks = ', '.join(str(r['K']) for r in m['losses'])
    hi = (cmp.get('ci95') or [None, None])[1]
    rows.append(
        [
            f"{fmt_budget(m['budget'])} {AXIS_UNITS[axis]}",
            fmt_num(m['budget'] / anchor, '.3g') + 'x' if anchor else 'n/a',
            ranks,
            m['best_K'],
            fmt_diff(cmp),
            'yes' if _finite(hi) and hi < 0 else 'no',
        ]
    )
  return [
      _table(
          [
              'Budget',
              'x anchor',
              "K's measured",
              'Best K (measured)',
              'Best - runner-up [95% CI]',
              'Significant?',
          ],
          rows,
      )
  ]


def _paper_rule_lines(rule) -> list[str]:
  paper = (rule.get('paper_rule') or {}).get('ranges') or []
  parts = []
  for r in paper:
    hi = r['x_max']
    span = (
        f'< {hi:.3g}x'
        if not r['x_min']
        else f"> {r['x_min']:.3g}x"
        if hi is None
        else f"{r['x_min']:.3g}x - {hi:.3g}x"
    )
    parts.append(f'{span} -> K={r["best_K"]}')
  if not parts:
    return []
  return [
      '',
      "Paper 82's hand-written rule, as multiples of its anchor (K=32 x 40"
      ' steps, 61.5M param-steps) and read on each axis as multiples of that'
      " axis's anchor: " + '; '.join(parts) + '.',
  ]


def _trend_lines(results) -> list[str]:
  trend = _analysis(results).get('budget_trend')
  if not trend:
    return [
        '',
        'Measured trend of the best K with the budget: '
        + NOT_RUN
        + " (no two K's measured at equal param-steps at two budgets).",
    ]
  rows = []
  for entry in trend['series']:
    for p in entry['points']:
      rows.append(
          [
              f"K={entry['K_small']} vs K={entry['K_large']}",
              fmt_num(p.get('x_anchor'), '.3g') + 'x',
              f"{p['steps_small']} / {p['steps_large']}",
              fmt_diff(p['advantage']),
          ]
      )
  slope = trend['slope']
  return [
      '',
      "Measured trend (decides claim 5): the larger K's paired advantage"
      ' L(small K) - L(large K) at equal param-steps (above zero: the larger'
      ' K wins), per budget.',
      '',
      _table(
          [
              'Pair',
              'x anchor',
              'Steps (small / large K)',
              'Advantage of larger K [95% CI]',
          ],
          rows,
      ),
      '',
      f"Slope per doubling of the budget: {fmt_diff(slope, 'mean')}"
      f" (n={slope['n']} seeds, p={fmt_num(slope.get('p'), '.2g')},"
      f" P(slope < 0)={fmt_num(slope.get('prob_negative'), '.2f')}). A"
      ' negative slope means the smaller K gains as the budget grows.',
  ]


def rule_section(results, figures) -> list[str]:
  lines = ['', '## K-Budget Rule (Derived)']
  rule = _analysis(results).get('rule')
  if not rule:
    return lines + ['', NOT_RUN + '.']
  anchors = plotting.axis_anchors(results)
  lines += [
      '',
      'Best K per budget range from the fitted surface (argmin over the'
      " measured K's of L(K, budget / cost per step)), next to the best K"
      ' measured where cells share a budget.',
  ]
  for axis, title in AXIS_TITLES.items():
    if not any(
        r['axis'] == axis
        for r in rule.get('ranges', []) + rule.get('measured', [])
    ):
      continue
    anchor = anchors.get(axis)
    lines += ['', f'### {title}', '']
    lines += _fitted_rule_table(rule, axis, anchor) + ['']
    lines += _measured_rule_table(rule, axis, anchor)
  lines += _paper_rule_lines(rule)
  lines += _trend_lines(results)
  return lines + _figure(figures, 'rule', 'K-budget rule')


def verdicts_section(results) -> list[str]:
  lines = ['', '## Verdicts', '']
  verdicts = _analysis(results).get('verdicts')
  if not verdicts:
    return lines + [NOT_RUN + '.']
  rows = [
      [v['claim'], f"**{v['verdict']}**", v['statistic'], v['n_seeds']]
      for v in verdicts
  ]
  return lines + [
      'Each claim of paper 82 tested separately at the 95% level (no'
      ' multiplicity correction): confirmed or refuted only when the'
      ' interval excludes the other outcome.',
      '',
      _table(['Claim', 'Verdict', 'Statistic', 'n seeds'], rows),
  ]


def markdown(results: dict, figures: Mapping[str, str] | None = None) -> str:
  """The report; `figures` (name -> path) are embedded where they belong."""
  lines = _header(results)
  lines += ['', '## Setup', '', setup_table(results)]
  lines += budget_matched_section(results, figures)
  lines += multipliers_section(results)
  lines += crossover_section(results, figures)
  lines += axes_section(results, figures)
  lines += learning_rate_section(results)
  lines += fit_section(results, figures)
  lines += rule_section(results, figures)
  lines += verdicts_section(results)
  return '\n'.join(lines) + '\n'


def write_all(results: dict, workdir: str) -> dict[str, str]:
  """Writes results.json, the figures and report.md; returns their paths."""
  paths = {'results': os.path.join(workdir, 'results.json')}
  checkpoint.write_json(paths['results'], results)
  figures = plotting.draw_all(results, workdir)
  paths.update(figures)
  paths['report'] = os.path.join(workdir, 'report.md')
  checkpoint.write_text(paths['report'], markdown(results, figures))
  return paths
