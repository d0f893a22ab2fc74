"""Shared fixtures: tiny configs and the compile counter.

Every config here starts from `paper82.get_config('smoke')` and shrinks it to
dims of 16-32, one layer and 16 tokens, so that a test compiles in seconds on
a 2-core CPU.
"""

import functools
import os
import shutil
import tempfile

import jax
import ml_collections
import pytest

from ctsft_jax import lowrank
from ctsft_jax import model as model_lib
from experiments.configs import paper82

# The event jax records once per XLA backend compilation (jax._src.dispatch).
BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


def pytest_configure(config):
  """Binaries run by the tests share one persistent compilation cache.

  Set only in the environment the subprocesses inherit: this process has
  imported jax already, so its in-process compile counts stay exact.
  """
  del config
  # Start JAX now, with its default single CPU device: the binaries' mains
  # split a CPU host into one device per core only before JAX has started
  # (environment.split_cpu_host), so an in-process test must not be the
  # first to start it. Tests of the split run in subprocesses.
  jax.devices()
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    _SESSION_CACHE.append(tempfile.mkdtemp(prefix='ctsft-jax-cache-'))
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _SESSION_CACHE[0]


def pytest_unconfigure(config):
  del config
  for directory in _SESSION_CACHE:
    shutil.rmtree(directory, ignore_errors=True)
    os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)


_SESSION_CACHE = []


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The smoke config shrunk to a 16-wide, 1-layer model and K in {1, 2}.

  Args:
    **overrides: dotted keys with '__' for '.', e.g. `model__n_layers=2`.

  Returns:
    A locked config whose only enabled study is budget_matched over K = 1, 2
    with the budget anchored at K=2 x 4 steps.
  """
  config = paper82.get_config('smoke')
  config.seeds = 2
  config.model.d_model = 16
  config.model.n_heads = 2
  config.model.n_layers = 1
  config.model.d_mlp = 32
  config.model.max_len = 16
  config.data.source = 'synthetic'
  config.data.seq_len = 16
  config.data.max_prompt_tokens = 8
  config.data.synthetic_examples = 200
  config.data.max_eval_examples = 32
  config.data.batch_size = 4
  config.base.kind = 'random'
  config.train.eval_batch = 16
  for name in config.studies:
    config.studies[name].enabled = name == 'budget_matched'
  config.studies.budget_matched.ranks = (1, 2)
  config.budget.anchor_rank = 2
  config.budget.anchor_steps = 4
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split('__')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def init_base(model_config, seed: int = 0):
  """Random base params, jit-compiled (eager init costs seconds on CPU)."""
  init = jax.jit(functools.partial(model_lib.init_base, model_config))
  return init(jax.random.key(seed))


def init_factors(model_config, rank: int, targets, seed: int = 1):
  """Random A and zero B of rank K for `targets`, jit-compiled."""
  shapes = lowrank.factor_shapes(model_config, rank, tuple(targets))
  init = jax.jit(functools.partial(lowrank.init_factors, shapes))
  return init(jax.random.key(seed))


@pytest.fixture(scope='session')
def make_config():
  """A factory of tiny configs; see `tiny_config`."""
  return tiny_config


@pytest.fixture(scope='session')
def make_base():
  """`init_base(model_config, seed=0)`: random frozen base params."""
  return init_base


@pytest.fixture(scope='session')
def make_factors():
  """`init_factors(model_config, rank, targets, seed=1)`: A random, B zero."""
  return init_factors


class CompileCounter:
  """Counts XLA backend compilations while it is registered."""

  def __init__(self):
    self.names = []

  def __call__(self, event: str, duration: float, **kwargs) -> None:
    del duration
    if event == BACKEND_COMPILE_EVENT:
      self.names.append(kwargs.get('fun_name', '?'))

  @property
  def count(self) -> int:
    return len(self.names)


@pytest.fixture
def compile_counter():
  """A CompileCounter listening for the duration of the test."""
  counter = CompileCounter()
  jax.monitoring.register_event_duration_secs_listener(counter)
  yield counter
  jax.monitoring.unregister_event_duration_listener(counter)
