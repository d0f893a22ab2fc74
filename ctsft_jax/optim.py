"""The optimizer and learning-rate schedules.

The optimizer is AdamW (Loshchilov & Hutter, 2019) with optional global-norm
clipping, wrapped in `optax.inject_hyperparams` so that the learning rate is a
value in the optimizer state. The trainer writes that value every step as
`peak_lr * lr_factor(step, total_steps)`, which lets every seed lane carry its
own peak learning rate (for learning-rate grids) and its own run length (for
decaying schedules) inside one compiled program.
"""

import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ('constant', 'cosine', 'linear')


def lr_factor(
    step: jnp.ndarray,
    total_steps: jnp.ndarray,
    *,
    warmup_steps: int,
    schedule: str,
    end_factor: float,
) -> jnp.ndarray:
  """Multiplier of the peak learning rate at `step` (0-based) of a run.

  Linear warmup over `warmup_steps`, then `constant` (1), `cosine` or `linear`
  decay to `end_factor` at `total_steps`. Only the decaying schedules depend on
  `total_steps`; that is what decides whether runs can share prefixes.
  """
  step = jnp.asarray(step, jnp.float32)
  warm = (
      jnp.minimum(1.0, (step + 1.0) / warmup_steps) if warmup_steps > 0 else 1.0
  )
  span = jnp.maximum(jnp.asarray(total_steps, jnp.float32) - warmup_steps, 1.0)
  progress = jnp.clip((step - warmup_steps) / span, 0.0, 1.0)
  if schedule == 'constant':
    decay = 1.0
  elif schedule == 'cosine':
    decay = end_factor + (1 - end_factor) * 0.5 * (
        1 + jnp.cos(jnp.pi * progress)
    )
  elif schedule == 'linear':
    decay = 1.0 - (1.0 - end_factor) * progress
  else:
    raise ValueError(f'optim.schedule={schedule!r} is not one of {SCHEDULES}')
  return warm * decay


def depends_on_total_steps(optim_config: ml_collections.ConfigDict) -> bool:
  """Whether a run's schedule changes with its length (no prefix sharing)."""
  return optim_config.schedule != 'constant'


def _adamw(learning_rate, weight_decay, b1, b2, eps, max_grad_norm):
  """AdamW on the raveled parameter vector (`optax.flatten`).

  One vector instead of a tree of small factors: the update is a handful of
  fused kernels, which roughly halves its compile time.
  """
  transforms = []
  if max_grad_norm > 0:
    transforms.append(optax.clip_by_global_norm(max_grad_norm))
  transforms.append(
      optax.adamw(
          learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay
      )
  )
  return optax.flatten(optax.chain(*transforms))


def make_optimizer(
    optim_config: ml_collections.ConfigDict,
) -> optax.GradientTransformation:
  """AdamW whose `learning_rate` hyperparameter the trainer sets each step."""
  return optax.inject_hyperparams(_adamw, static_args=('max_grad_norm',))(
      learning_rate=0.0,
      weight_decay=optim_config.weight_decay,
      b1=optim_config.b1,
      b2=optim_config.b2,
      eps=optim_config.eps,
      max_grad_norm=optim_config.max_grad_norm,
  )


def with_learning_rate(opt_state, learning_rate: jnp.ndarray):
  """Returns `opt_state` with its injected learning rate replaced."""
  hyperparams = dict(opt_state.hyperparams)
  hyperparams['learning_rate'] = jnp.asarray(
      learning_rate, opt_state.hyperparams['learning_rate'].dtype
  )
  return opt_state._replace(hyperparams=hyperparams)
