"""The frozen base model: a random init, or pretrained on stdlib source code.

`pretrain` trains every parameter of the model as a byte-level language model
on the Python standard library's source files from the training split (never
the files whose functions are held out for eval), with AdamW and a cosine
schedule, and saves the parameters as an Orbax checkpoint. `load_base` returns
the base for a sweep: random, restored from `base.checkpoint`, or pretrained
once per model/pretraining config and cached.
"""

import functools
import hashlib
import json
import os
import platform
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from ctsft_jax import checkpoint
from ctsft_jax import data as data_lib
from ctsft_jax import model as model_lib
from ctsft_jax import train as train_lib


def cache_root(config: ml_collections.ConfigDict) -> str:
  return config.train.cache_dir or os.path.join(
      os.path.expanduser('~'), '.cache', 'ctsft_jax'
  )


def _pretrain_key(config: ml_collections.ConfigDict) -> str:
  """Hash of everything that determines the pretrained parameters."""
  keys = dict(
      model=config.model.to_dict(),
      base={k: v for k, v in config.base.items() if k != 'checkpoint'},
      data={
          k: config.data[k]
          for k in ('seq_len', 'eval_fraction', 'max_prompt_tokens')
      },
      python=platform.python_version(),
      jax=jax.__version__,
  )
  text = json.dumps(keys, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def pretrain_optim(config: ml_collections.ConfigDict):
  """The optimizer settings of pretraining: AdamW, warmup, cosine decay."""
  optim_config = ml_collections.ConfigDict(config.optim.to_dict())
  optim_config.learning_rate = config.base.pretrain_lr
  optim_config.schedule = 'cosine'
  optim_config.warmup_steps = max(1, config.base.pretrain_steps // 20)
  optim_config.end_factor = 0.1
  optim_config.weight_decay = 0.01
  return optim_config


def pretrain(config: ml_collections.ConfigDict, *, cache_dir: str | None):
  """Trains the base on stdlib source; returns (params, final loss)."""
  corpus = data_lib.load_pretrain_corpus(
      config.data,
      cache_dir=cache_dir,
      max_windows=config.base.pretrain_max_windows,
  )
  train = train_lib.DataArrays(
      *(jnp.asarray(x) for x in (corpus.inputs, corpus.targets, corpus.weights))
  )
  steps = config.base.pretrain_steps
  task = train_lib.full_task(config.model)
  programs = train_lib.compile_programs(
      task,
      optim_config=pretrain_optim(config),
      batch_size=config.base.pretrain_batch_size,
      eval_batch=config.train.eval_batch,
      n_lanes=1,
      chunk_steps=min(steps, config.train.chunk_steps),
      frozen={},
      train=train,
      eval_data=None,
  )
  init_keys, data_keys = train_lib.lane_keys([config.base.seed])
  state = programs.init(
      init_keys,
      jnp.full((1,), config.base.pretrain_lr),
      jnp.full((1,), steps, jnp.int32),
  )
  start = time.perf_counter()
  while int(state.step) < steps:
    n = min(steps - int(state.step), programs.chunk_steps)
    state, losses = train_lib.advance(programs, state, {}, train, data_keys, n)
    done = int(state.step)
    logging.info(
        'pretrain: step %d/%d, loss %.4f, %.1f steps/s',
        done,
        steps,
        float(losses[-1, 0]),
        done / (time.perf_counter() - start),
    )
  if int(state.status[0]) != train_lib.OK:
    raise RuntimeError('pretraining diverged; lower base.pretrain_lr')
  params = jax.tree.map(lambda x: x[0], state.params)
  return params, float(losses[-1, 0])


def _abstract_params(config: ml_collections.ConfigDict):
  return jax.eval_shape(
      functools.partial(model_lib.init_base, config.model), jax.random.key(0)
  )


def check_checkpoint(config: ml_collections.ConfigDict) -> None:
  """Fails with one line when `base.checkpoint` is missing or mismatched."""
  if config.base.kind == 'pretrained' and config.base.checkpoint:
    checkpoint.check_params(config.base.checkpoint, _abstract_params(config))


def load_base(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """The frozen base params and a JSON-able description of where they came from."""
  base_cfg = config.base
  if base_cfg.kind == 'random':
    init = jax.jit(functools.partial(model_lib.init_base, config.model))
    params = init(jax.random.key(base_cfg.seed))  # eager init is much slower
    return params, dict(kind='random', seed=base_cfg.seed)
  abstract = _abstract_params(config)
  if base_cfg.checkpoint:
    params = checkpoint.restore_params(base_cfg.checkpoint, abstract)
    return params, dict(kind='pretrained', checkpoint=base_cfg.checkpoint)
  root = cache_root(config)
  path = os.path.join(root, 'base', _pretrain_key(config))
  if os.path.isdir(path):
    logging.info('Using the cached pretrained base at %s', path)
    params = checkpoint.restore_params(path, abstract)
    return params, dict(kind='pretrained', checkpoint=path, cached=True)
  logging.info('No pretrained base for this config yet; pretraining one.')
  params, loss = pretrain(config, cache_dir=root)
  checkpoint.save_params(path, params)
  logging.info('Saved the pretrained base to %s', path)
  return params, dict(
      kind='pretrained', checkpoint=path, cached=False, pretrain_loss=loss
  )
