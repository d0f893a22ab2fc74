"""Figures of a sweep, drawn from results.json alone (no training needed)."""

import os
import tempfile

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from ctsft_jax import analysis


def save_figure(fig, path: str) -> None:
  """Saves a PNG atomically and closes the figure."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.png')
  os.close(fd)
  fig.savefig(tmp, dpi=120, bbox_inches='tight')
  plt.close(fig)
  os.replace(tmp, path)


def _mean_band(cells: list[dict], metric: str):
  ks, means, lows, highs = [], [], [], []
  for cell in sorted(cells, key=lambda c: c['K']):
    summary = analysis.mean_ci(cell[metric])
    ks.append(cell['K'])
    means.append(summary['mean'])
    lo, hi = summary['ci95']
    lows.append(summary['mean'] if np.isnan(lo) else lo)
    highs.append(summary['mean'] if np.isnan(hi) else hi)
  return ks, means, lows, highs


def loss_vs_k(results: dict, path: str) -> None:
  """Budget-matched final eval loss against K: mean, 95% CI band, seeds."""
  cells = [c for c in results['cells'] if c['study'] == 'budget_matched']
  fig, ax = plt.subplots(figsize=(6, 4))
  ks, means, lows, highs = _mean_band(cells, 'final_eval_loss')
  ax.fill_between(ks, lows, highs, alpha=0.25, label='95% CI over seeds')
  ax.plot(ks, means, 'o-', label='mean')
  for cell in cells:
    values = [v for v in cell['final_eval_loss'] if v is not None]
    ax.scatter([cell['K']] * len(values), values, s=8, color='gray', zorder=3)
  ax.set_xscale('log', base=2)
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.set_xlabel('K (rank), steps = budget / trainable_params(K)')
  ax.set_ylabel('final eval loss (nats/token)')
  ax.set_title(
      f"Budget-matched: {results['budget']['param_steps']:,} param-steps,"
      f" {len(results['seeds'])} seeds"
  )
  ax.legend()
  ax.grid(alpha=0.3)
  save_figure(fig, path)
