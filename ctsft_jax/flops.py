"""Analytic model FLOPs of one training step, per seed.

Counts the matmul FLOPs (2 per multiply-add) that dominate the step; norms,
softmax, the loss and the optimizer update are left out. `tests/test_flops.py`
checks the count against XLA's cost analysis of the compiled step.

For low-rank training of a frozen base:
  - every base Dense costs 2*d_in*d_out per token forward and the same again
    backward (only the input gradient is needed: the weight is frozen);
  - attention scores and the weighted sum cost 4*T*d_model per token forward
    and twice that backward (both operands are activations);
  - every factor pair costs 2*K*(d_in + d_out) per token forward and twice
    that backward (input gradient and the factors' own gradients).
Full training (rank 0) pays the weight gradients too: 3x forward throughout.
This is why param-steps are not compute: the base's share does not shrink
with K.
"""

import ml_collections

from ctsft_jax import model as model_lib


def dense_shapes(model_config: ml_collections.ConfigDict) -> dict:
  """(d_in, d_out) of every Dense, keyed by module path."""
  m = model_config
  shapes = {}
  for i in range(m.n_layers):
    for name in ('q', 'k', 'v', 'o'):
      shapes[f'block_{i}/attn/{name}'] = (m.d_model, m.d_model)
    shapes[f'block_{i}/mlp/up'] = (m.d_model, m.d_mlp)
    shapes[f'block_{i}/mlp/down'] = (m.d_mlp, m.d_model)
  shapes['head'] = (m.d_model, m.vocab_size)
  return shapes


def step_flops(
    model_config: ml_collections.ConfigDict,
    rank: int,
    *,
    targets,
    batch_size: int,
    seq_len: int,
) -> float:
  """FLOPs of one train step of one seed; `rank=0` means full training."""
  shapes = dense_shapes(model_config)
  dense = sum(2 * d_in * d_out for d_in, d_out in shapes.values())
  attention = 4 * seq_len * model_config.d_model * model_config.n_layers
  if rank == 0:
    per_token = 3 * (dense + attention)
  else:
    factors = sum(
        2 * rank * (d_in + d_out)
        for path, (d_in, d_out) in shapes.items()
        if model_lib.matches(path, targets)
    )
    per_token = 2 * dense + 3 * attention + 3 * factors
  return float(per_token * batch_size * seq_len)


def flops_per_step(
    config: ml_collections.ConfigDict, ranks
) -> dict[int, float]:
  """`step_flops` of the sweep's batch and sequence for each K."""
  return {
      k: step_flops(
          config.model,
          k,
          targets=tuple(config.lowrank.targets),
          batch_size=config.data.batch_size,
          seq_len=config.data.seq_len,
      )
      for k in ranks
  }
