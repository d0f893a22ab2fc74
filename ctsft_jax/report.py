"""Writes a sweep's artifacts: results.json, report.md and the figures.

Every file is written atomically (a temporary file, then a rename), so a
reader never sees a half-written result.
"""

import math
import os

from ctsft_jax import analysis
from ctsft_jax import checkpoint
from ctsft_jax import plotting


def fmt_ci(values) -> str:
  """'mean ± half-width' of the 95% t interval over the finite values."""
  summary = analysis.mean_ci(values)
  mean, (lo, hi) = summary['mean'], summary['ci95']
  if math.isnan(mean):
    return 'n/a'
  if math.isnan(lo):
    return f'{mean:.4f}'
  return f'{mean:.4f} ± {(hi - lo) / 2:.4f}'


def _table(header: list[str], rows: list[list]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def setup_table(results: dict) -> str:
  rows = [
      [
          r['K'],
          f"{r['trainable_params']:,}",
          r['steps'],
          f"{r['param_steps']:,}",
      ]
      for r in results['setup']
  ]
  return _table(['K', 'Params', 'Steps', 'Total Param-Steps'], rows)


def _diverged_note(cell: dict) -> str:
  n = cell['status'].count('diverged')
  return f'{n} diverged' if n else ''


def budget_matched_table(results: dict) -> str:
  cells = [c for c in results['cells'] if c['study'] == 'budget_matched']
  rows = [
      [
          c['K'],
          c['steps'],
          fmt_ci(c['final_eval_loss']),
          fmt_ci(c['final_train_loss']),
          _diverged_note(c),
      ]
      for c in sorted(cells, key=lambda c: c['K'])
  ]
  return _table(
      ['K', 'Steps', 'Final eval loss', 'Final train loss', 'Note'], rows
  )


def _header(results: dict) -> list[str]:
  cfg, env = results['config'], results['environment']
  data, base = results['data'], results['base']
  n = len(results['seeds'])
  largest = max(r['K'] for r in results['setup']) if results['setup'] else None
  lines = [
      '# K-budget sweep',
      '',
      f"Budget: {results['budget']['param_steps']:,} param-steps"
      f" (anchor K={results['budget']['anchor_K']} x"
      f" {results['budget']['anchor_steps']} steps). Seeds: {n}"
      f" ({results['seeds'][0]}..{results['seeds'][-1]}); losses are means ±"
      ' the half-width of the 95% t interval over seeds; per-seed values are'
      ' in results.json.',
      '',
      f"Data: {data.get('source')} ({data.get('n_train')} train /"
      f" {data.get('n_eval')} eval examples, sha256"
      f" {str(data.get('sha256'))[:12]}, Python {data.get('python_version')})."
      f" Base: {base.get('kind')}; untuned base eval loss"
      f" {results['base_eval_loss']:.4f}.",
      '',
      f"Model: d_model={cfg['model']['d_model']},"
      f" layers={cfg['model']['n_layers']}, d_mlp={cfg['model']['d_mlp']},"
      f" seq_len={cfg['data']['seq_len']}; scaling"
      f" {cfg['lowrank']['scaling']} (alpha={cfg['lowrank']['alpha']}); AdamW"
      f" lr={cfg['optim']['learning_rate']} ({cfg['optim']['schedule']}"
      ' schedule, fixed for every K).',
  ]
  if largest is not None:
    lines += [
        '',
        f'Largest K {largest} against min(d_in, d_out) of the targets'
        f" {base['max_rank']}: ratio {largest / base['max_rank']:.2f}.",
    ]
  lines += [
      '',
      f"Ran on {env['backend']} ({env['device_count']} x"
      f" {env['device_kind']}), jax {env['packages']['jax']}.",
  ]
  return lines


def markdown(results: dict) -> str:
  """The report: the paper's Setup and Budget-Matched tables, and context."""
  lines = _header(results)
  lines += ['', '## Setup', '', setup_table(results)]
  lines += [
      '',
      '## Budget-Matched K Curve',
      '',
      "Final eval loss is on the fixed held-out set at the cell's last step;"
      " final train loss is the mean over the cell's last tenth of steps.",
      '',
      budget_matched_table(results),
      '',
      '![loss vs K](loss_vs_k.png)',
  ]
  return '\n'.join(lines) + '\n'


def write_all(results: dict, workdir: str) -> dict[str, str]:
  """Writes results.json, report.md and the figures; returns their paths."""
  paths = dict(
      results=os.path.join(workdir, 'results.json'),
      report=os.path.join(workdir, 'report.md'),
      loss_vs_k=os.path.join(workdir, 'loss_vs_k.png'),
  )
  checkpoint.write_json(paths['results'], results)
  plotting.loss_vs_k(results, paths['loss_vs_k'])
  checkpoint.write_text(paths['report'], markdown(results))
  return paths
