"""The compiled trainer: one program per K, vmapped over lanes, scanned over steps.

A *lane* is one independent training run inside the program: a seed (and, with
a learning-rate grid, one learning rate). All lanes of a K share the compiled
program and the frozen base; each has its own factors, optimizer state, data
stream and status. The host drives the program in chunks of `chunk_steps`
steps so that it can report progress, evaluate and checkpoint in between.

Randomness never depends on how the run was chunked or resumed: lane `l` draws
the batch of step `t` from `fold_in(data_key[l], t)`, and its factors are
initialised from its own `init_key`. Seed i therefore sees the same data
stream for every K, which makes comparisons across K paired.

Divergence is isolated per lane: when a lane's loss or gradients stop being
finite, its parameters and optimizer state are held where they were and its
status becomes DIVERGED; the other lanes continue bitwise unchanged.
"""

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ctsft_jax import errors
from ctsft_jax import lowrank
from ctsft_jax import model as model_lib
from ctsft_jax import optim

PyTree = Any
OK, DIVERGED = 0, 1
# Purposes folded into a seed's key to derive independent streams.
INIT_PURPOSE, DATA_PURPOSE = 0, 1


class LaneState(NamedTuple):
  """Training state of all lanes of one K; leading axis L is the lane."""

  params: PyTree  # trainable tree, leaves [L, ...] float32 (factors or full)
  opt_state: PyTree  # optax state of `params` only, leaves [L, ...]
  peak_lr: jax.Array  # [L] float32, peak learning rate of each lane
  total_steps: jax.Array  # [L] int32, schedule length; a lane stops there
  status: jax.Array  # [L] int32, OK or DIVERGED
  diverged_step: jax.Array  # [L] int32, step that first went non-finite, or -1
  last_loss: jax.Array  # [L] float32, last finite train loss (0 at start)
  step: jax.Array  # [] int32, steps completed by the program


class DataArrays(NamedTuple):
  """A split on device: inputs/targets [N, T] int32, weights [N, T] f32."""

  inputs: jax.Array
  targets: jax.Array
  weights: jax.Array


def lane_keys(seeds) -> tuple[jax.Array, jax.Array]:
  """(init_keys, data_keys), each [L], from integer seeds, one per lane."""
  keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
  fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
  return fold(keys, INIT_PURPOSE), fold(keys, DATA_PURPOSE)


def weighted_cross_entropy(logits, targets, weights) -> jax.Array:
  """Mean token cross-entropy over positions with weight 1 (response tokens)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def sample_batch(data: DataArrays, key, step, batch_size: int) -> DataArrays:
  """The batch of `step`: rows drawn with replacement from fold_in(key, step)."""
  rows = jax.random.randint(
      jax.random.fold_in(key, step), (batch_size,), 0, data.inputs.shape[0]
  )
  return DataArrays(*(x[rows] for x in data))


def _tree_where(mask, new, old):
  return jax.tree.map(lambda a, b: jnp.where(mask, a, b), new, old)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves))


@dataclasses.dataclass(frozen=True)
class Task:
  """What the trainer trains: a model, how variables are assembled, the init.

  Attributes:
    rank: K, or 0 for full training of every parameter.
    module: the Flax model.
    variables: maps (trainable, frozen) to the variables given to `apply`.
    init_params: maps an init key to one lane's trainable tree.
  """

  rank: int
  module: Any
  variables: Callable[[PyTree, PyTree], dict]
  init_params: Callable[[jax.Array], PyTree]

  def loss(self, params, frozen, batch: DataArrays) -> jax.Array:
    logits = self.module.apply(self.variables(params, frozen), batch.inputs)
    return weighted_cross_entropy(logits, batch.targets, batch.weights)


def lowrank_task(config: ml_collections.ConfigDict, rank: int) -> Task:
  """Trains rank-K factors on a frozen base (`frozen` is the base params)."""
  lr_cfg = config.lowrank
  module = model_lib.build(
      config.model,
      rank,
      scaling_rule=lr_cfg.scaling,
      alpha=lr_cfg.alpha,
      targets=tuple(lr_cfg.targets),
  )
  shapes = lowrank.factor_shapes(config.model, rank, tuple(lr_cfg.targets))
  return Task(
      rank=rank,
      module=module,
      variables=lambda p, f: {'params': f, model_lib.LOWRANK: p},
      init_params=functools.partial(lowrank.init_factors, shapes),
  )


def full_task(model_config: ml_collections.ConfigDict) -> Task:
  """Trains every parameter (pretraining, full fine-tuning); no frozen part."""
  return Task(
      rank=0,
      module=model_lib.build(model_config),
      variables=lambda p, f: {'params': p},
      init_params=functools.partial(model_lib.init_base, model_config),
  )


def init_state(task, optimizer, init_keys, peak_lr, total_steps) -> LaneState:
  """Fresh lanes: params from each lane's init key, optimizer state, status."""
  params = jax.vmap(task.init_params)(init_keys)
  n = init_keys.shape[0]
  return LaneState(
      params=params,
      opt_state=jax.vmap(optimizer.init)(params),
      peak_lr=jnp.asarray(peak_lr, jnp.float32).reshape(n),
      total_steps=jnp.asarray(total_steps, jnp.int32).reshape(n),
      status=jnp.full((n,), OK, jnp.int32),
      diverged_step=jnp.full((n,), -1, jnp.int32),
      last_loss=jnp.zeros((n,), jnp.float32),
      step=jnp.zeros((), jnp.int32),
  )


def _lane_step(task, optimizer, schedule, lane, frozen, batch, step):
  """One optimizer step of one lane; holds the lane if it is done or bad."""
  params, opt_state, peak_lr, total, status, div_step, last = lane
  loss, grads = jax.value_and_grad(task.loss)(params, frozen, batch)
  finite = jnp.isfinite(loss) & _all_finite(grads)
  opt_state = optim.with_learning_rate(
      opt_state, peak_lr * schedule(step, total)
  )
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  running = (status == OK) & (step < total)
  take = running & finite
  newly_bad = running & ~finite
  lane = (
      _tree_where(take, new_params, params),
      _tree_where(take, new_opt_state, opt_state),
      peak_lr,
      total,
      jnp.where(newly_bad, DIVERGED, status),
      jnp.where(newly_bad, step, div_step),
      jnp.where(take, loss, last),
  )
  return lane, loss


def make_train_chunk(
    task: Task,
    optimizer: optax.GradientTransformation,
    schedule: Callable,
    *,
    chunk_steps: int,
    batch_size: int,
    shared_data: bool = False,
):
  """Returns the pure `chunk(state, frozen, train, data_keys, n_steps)`.

  It scans over `chunk_steps` slots and runs a step of every lane in the
  first `n_steps` of them (a traced int, so any length up to `chunk_steps`
  uses the same compiled program; the host ends chunks exactly where it wants
  to evaluate or checkpoint). Skipped slots cost nothing: their predicate is
  shared by all lanes, so `lax.cond` stays a real branch under `vmap`. Returns
  the new state and the per-slot train losses [chunk_steps, L] (NaN in skipped
  slots). With `shared_data`, `data_keys` is one key and every lane sees the
  same batches, so data-only work is done once rather than once per lane.
  """
  lane_step = functools.partial(_lane_step, task, optimizer, schedule)
  sample = functools.partial(sample_batch, batch_size=batch_size)

  def chunk(state: LaneState, frozen, train: DataArrays, data_keys, n_steps):
    def step_all(state: LaneState):
      step = state.step
      if shared_data:
        batch, batch_axis = sample(train, data_keys, step), None
      else:
        batch = jax.vmap(sample, in_axes=(None, 0, None))(
            train, data_keys, step
        )
        batch_axis = 0
      lane, loss = jax.vmap(lane_step, in_axes=(0, None, batch_axis, None))(
          tuple(state[:-1]), frozen, batch, step
      )
      return LaneState(*lane, step + 1), loss

    def skip(state: LaneState):
      return state, jnp.full(state.peak_lr.shape, jnp.nan, jnp.float32)

    def body(state: LaneState, slot):
      return jax.lax.cond(slot < n_steps, step_all, skip, state)

    return jax.lax.scan(body, state, jnp.arange(chunk_steps))

  return chunk


def make_evaluate(task: Task, *, eval_batch: int):
  """Returns the pure `evaluate(params, frozen, data) -> [L]` eval losses.

  The loss of a lane is the weighted mean cross-entropy over the whole
  held-out set (all its response tokens), computed in batches of
  `eval_batch` rows. `data` rows must be a multiple of `eval_batch`; pad with
  zero-weight rows (see `pad_rows`).
  """

  def one_lane(params, frozen, data: DataArrays):
    def body(carry, batch):
      logits = task.module.apply(task.variables(params, frozen), batch.inputs)
      losses = optax.softmax_cross_entropy_with_integer_labels(
          logits, batch.targets
      )
      total, count = carry
      return (
          total + jnp.sum(losses * batch.weights),
          count + jnp.sum(batch.weights),
      ), None

    batches = jax.tree.map(
        lambda x: x.reshape((-1, eval_batch) + x.shape[1:]), data
    )
    (total, count), _ = jax.lax.scan(body, (0.0, 0.0), batches)
    return total / jnp.maximum(count, 1.0)

  return jax.vmap(one_lane, in_axes=(0, None, None))


def pad_rows(data: DataArrays, multiple: int) -> DataArrays:
  """Pads a split with zero-weight rows to a multiple of `multiple` rows."""
  n = data.inputs.shape[0]
  extra = -n % multiple
  if not extra:
    return data
  return DataArrays(
      *(
          jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])
          for x in data
      )
  )


@dataclasses.dataclass(frozen=True)
class Programs:
  """The compiled programs of one K (or of full training)."""

  task: Task
  chunk_steps: int
  init: Any  # compiled (init_keys, peak_lr, total_steps) -> LaneState
  train_chunk: (
      Any  # compiled (state, frozen, train, data_keys) -> (state, loss)
  )
  evaluate: Any  # compiled (params, frozen, data) -> [L] eval loss
  compile_seconds: float


def schedule_fn(optim_config: ml_collections.ConfigDict) -> Callable:
  return functools.partial(
      optim.lr_factor,
      warmup_steps=optim_config.warmup_steps,
      schedule=optim_config.schedule,
      end_factor=optim_config.end_factor,
  )


class Placement(NamedTuple):
  """Shardings of a lane program: lane-leading arrays split over a mesh.

  With one device both are None and jit places everything on it.
  """

  lanes: Any  # NamedSharding splitting axis 0 over 'lanes', or None
  replicated: Any  # NamedSharding replicating over the mesh, or None

  def of(self, tree):
    """Per leaf: split when it has a leading lane axis, else replicate."""
    if self.lanes is None:
      return None
    return jax.tree.map(
        lambda x: self.lanes if getattr(x, 'ndim', 0) >= 1 else self.replicated,
        tree,
    )

  @property
  def device_count(self) -> int:
    """How many devices the lanes are split over."""
    return 1 if self.lanes is None else self.lanes.mesh.size

  def put(self, tree, *, lanes: bool):
    """Moves a tree onto the mesh, split over lanes or replicated."""
    if self.lanes is None:
      return tree
    return jax.device_put(tree, self.lanes if lanes else self.replicated)


def placement(n_lanes: int, devices=None) -> Placement:
  """Splits the lanes evenly over all devices (one Mesh axis, 'lanes')."""
  devices = list(devices or jax.devices())
  if len(devices) == 1:
    return Placement(None, None)
  if n_lanes % len(devices):
    raise errors.UserError(
        f'seeds x learning rates = {n_lanes} lanes cannot be split evenly over'
        f' {len(devices)} devices; use a multiple of {len(devices)} lanes'
    )
  mesh = jax.sharding.Mesh(np.array(devices), ('lanes',))
  return Placement(
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('lanes')),
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
  )


def xla_flops(compiled) -> float | None:
  """FLOPs of a compiled program by XLA's cost analysis, or None."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get('flops')
  return float(flops) if flops is not None and flops >= 0 else None


def xla_flops_per_lane_step(
    compiled, n_lanes: int, place: Placement
) -> float | None:
  """XLA's FLOPs of one lane's train step, from a lane program's chunk.

  XLA counts the chunk's scan body once. With the lanes split over devices
  the analysis describes one device's partition, which holds
  n_lanes / device_count lanes.
  """
  flops = xla_flops(compiled)
  return None if flops is None else flops * place.device_count / n_lanes


def _program_shardings(place: Placement, state, *, shared_data: bool):
  """jit sharding arguments of init, chunk and eval; none on one device."""
  if place.lanes is None:
    return dict(init={}, chunk={}, eval={})
  state_sh, rep = place.of(state), place.replicated
  losses = jax.sharding.NamedSharding(
      place.lanes.mesh, jax.sharding.PartitionSpec(None, 'lanes')
  )
  keys = rep if shared_data else place.lanes
  return dict(
      init=dict(in_shardings=place.lanes, out_shardings=state_sh),
      chunk=dict(
          in_shardings=(state_sh, rep, rep, keys, rep),
          out_shardings=(state_sh, losses),
      ),
      eval=dict(
          in_shardings=(state_sh.params, rep, rep),
          out_shardings=place.lanes,
      ),
  )


def compile_programs(
    task: Task,
    *,
    optim_config: ml_collections.ConfigDict,
    batch_size: int,
    eval_batch: int,
    n_lanes: int,
    chunk_steps: int,
    frozen: PyTree,
    train: DataArrays,
    eval_data: DataArrays | None,
    shared_data: bool = False,
    place: Placement = Placement(None, None),
) -> Programs:
  """Compiles init, the train chunk and evaluation once, ahead of time.

  Later calls with other shapes fail loudly instead of recompiling, so a
  sweep compiles exactly these programs once per K. With a multi-device
  `place`, every lane-leading array is split over the devices and the rest
  is replicated: the same programs, partitioned by XLA.
  """
  optimizer = optim.make_optimizer(optim_config)
  chunk = make_train_chunk(
      task,
      optimizer,
      schedule_fn(optim_config),
      chunk_steps=chunk_steps,
      batch_size=batch_size,
      shared_data=shared_data,
  )
  init_keys, data_keys = jax.eval_shape(lambda: lane_keys(range(n_lanes)))
  if shared_data:
    data_keys = jax.ShapeDtypeStruct((), data_keys.dtype)
  lanes_f32 = jax.ShapeDtypeStruct((n_lanes,), jnp.float32)
  lanes_i32 = jax.ShapeDtypeStruct((n_lanes,), jnp.int32)
  init = functools.partial(init_state, task, optimizer)
  state = jax.eval_shape(init, init_keys, lanes_f32, lanes_i32)
  shardings = _program_shardings(place, state, shared_data=shared_data)
  n_steps = jax.ShapeDtypeStruct((), jnp.int32)
  start = time.perf_counter()
  init_c = (
      jax.jit(init, **shardings['init'])
      .lower(init_keys, lanes_f32, lanes_i32)
      .compile()
  )
  chunk_c = (
      jax.jit(chunk, donate_argnums=0, **shardings['chunk'])
      .lower(state, frozen, train, data_keys, n_steps)
      .compile()
  )
  eval_c = None
  if eval_data is not None:
    evaluate = make_evaluate(task, eval_batch=eval_batch)
    eval_c = (
        jax.jit(evaluate, **shardings['eval'])
        .lower(state.params, frozen, eval_data)
        .compile()
    )
  seconds = time.perf_counter() - start
  logging.info(
      'K=%d: compiled init, %d-step train chunk and eval for %d lanes in'
      ' %.1fs',
      task.rank,
      chunk_steps,
      n_lanes,
      seconds,
  )
  return Programs(task, chunk_steps, init_c, chunk_c, eval_c, seconds)


def advance(programs: Programs, state, frozen, train, data_keys, n_steps: int):
  """Runs `n_steps` steps in chunks; returns (state, losses [n_steps, L])."""
  rows = []
  while n_steps > 0:
    n = min(n_steps, programs.chunk_steps)
    state, losses = programs.train_chunk(
        state, frozen, train, data_keys, jnp.int32(n)
    )
    rows.append(np.asarray(losses)[:n])
    n_steps -= n
  return state, np.concatenate(rows)
