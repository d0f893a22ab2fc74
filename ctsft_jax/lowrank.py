"""The trainable low-rank factors: their shapes, initialisation and count.

For a targeted weight W of shape (d_in, d_out) the factor tree holds
`a` (K, d_in), drawn from N(0, 1/d_in), and `b` (K, d_out), all zeros, so the
tuned model equals the base model exactly at step 0; the update of W is
s(K) * a.T @ b (see `model.lowrank_delta` for why `a` is stored K-major). The tree mirrors the
module paths of the model, e.g. factors['block_0']['attn']['q']['a'].
"""

from typing import Any
import zlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctsft_jax import model as model_lib

PyTree = Any


def factor_shapes(
    model_config: ml_collections.ConfigDict, rank: int, targets
) -> PyTree:
  """ShapeDtypeStructs of the factor tree for rank K (no FLOPs spent)."""
  module = model_lib.build(model_config, rank, targets=targets)
  tokens = jax.ShapeDtypeStruct((1, model_config.max_len), jnp.int32)
  variables = jax.eval_shape(module.init, jax.random.key(0), tokens)
  return variables.get(model_lib.LOWRANK, {})


def init_factors(shapes: PyTree, key: jax.Array) -> PyTree:
  """Random A (std 1/sqrt(d_in)) and zero B for every target.

  Each target's A is drawn from its own key, folded in from a hash of its
  path, so adding or removing a target leaves the others' draws unchanged.
  The draws are batched into one random-number kernel (a vmap over the
  targets' keys) rather than one kernel per target, which keeps the compiled
  init small.
  """
  flat = flax.traverse_util.flatten_dict(shapes, sep='/')
  a_paths = sorted(p for p in flat if p.endswith('/a'))
  sizes = [int(np.prod(flat[p].shape)) for p in a_paths]
  keys = jnp.stack(
      [jax.random.fold_in(key, zlib.crc32(p.encode()) >> 1) for p in a_paths]
  )
  noise = jax.vmap(lambda k: jax.random.normal(k, (max(sizes),)))(keys)
  out = {p: jnp.zeros(s.shape, s.dtype) for p, s in flat.items()}
  for row, (path, size) in enumerate(zip(a_paths, sizes)):
    shape = flat[path].shape
    out[path] = noise[row, :size].reshape(shape) / np.sqrt(shape[1])
  return flax.traverse_util.unflatten_dict(out, sep='/')


def trainable_params(factors: PyTree) -> int:
  """Number of scalars in the factor tree (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(factors)))


def target_dims(shapes: PyTree) -> dict[str, tuple[int, int]]:
  """Maps each targeted weight's path to its (d_in, d_out)."""
  flat = flax.traverse_util.flatten_dict(shapes, sep='/')
  dims = {}
  for path, shape in flat.items():
    if path.endswith('/a'):
      dims[path[: -len('/a')]] = (shape.shape[1], -1)
  for path, shape in flat.items():
    if path.endswith('/b'):
      d_in, _ = dims[path[: -len('/b')]]
      dims[path[: -len('/b')]] = (d_in, shape.shape[1])
  return dims


def max_rank(model_config: ml_collections.ConfigDict, targets) -> int:
  """min(d_in, d_out) over all targets: the largest meaningful K."""
  dims = target_dims(factor_shapes(model_config, 1, targets))
  if not dims:
    raise ValueError(
        f'lowrank.targets={tuple(targets)} match no Dense layer of the model'
    )
  return min(min(d) for d in dims.values())
