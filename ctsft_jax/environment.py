"""A record of the software and hardware a result was produced with."""

import importlib.metadata
import os
import platform

from absl import logging
import jax


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def describe() -> dict:
  """Versions, backend, devices, XLA flags and PRNG: enough to reproduce."""
  devices = jax.devices()
  return dict(
      python=platform.python_version(),
      platform=platform.platform(),
      packages={
          p: _version(p)
          for p in (
              'jax',
              'jaxlib',
              'flax',
              'optax',
              'orbax-checkpoint',
              'chex',
              'numpy',
              'ml-collections',
              'absl-py',
          )
      },
      backend=jax.default_backend(),
      device_count=jax.device_count(),
      local_device_count=jax.local_device_count(),
      process_count=jax.process_count(),
      device_kind=devices[0].device_kind,
      xla_flags=os.environ.get('XLA_FLAGS', ''),
      prng_impl=str(jax.config.jax_default_prng_impl),
      enable_x64=bool(jax.config.jax_enable_x64),
  )


def enable_compilation_cache(directory: str) -> str | None:
  """Turns on JAX's persistent compilation cache in `directory`.

  Reruns, resumes and tests then load compiled programs instead of compiling
  them again. 'none' leaves the cache off. Returns the directory used.
  """
  if directory == 'none':
    return None
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory


def log_start(config) -> None:
  """Logs the devices and the resolved config, as the first thing a run does."""
  logging.info(
      'JAX %s on %s: %d device(s) %s, %d process(es)',
      jax.__version__,
      jax.default_backend(),
      jax.device_count(),
      [d.device_kind for d in jax.local_devices()],
      jax.process_count(),
  )
  logging.info('Config:\n%s', config)


def host_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def cpu_device_count(requested: int, n_lanes: int, cores: int) -> int:
  """How many devices to split a CPU host into for `n_lanes` lanes.

  `requested` 0 means one per core, lowered to the largest count that
  divides the lanes evenly (lanes are split evenly over devices); any other
  value is taken as it is.
  """
  if requested:
    return requested
  return max(d for d in range(1, min(cores, n_lanes) + 1) if n_lanes % d == 0)


def split_cpu_host(config) -> int | None:
  """Splits a CPU host into several JAX devices so that lanes run in parallel.

  XLA runs one program's operations largely one after another, and at this
  project's model sizes most of them are too small to use every core; with
  one device per core and the lanes split over them (see
  `train.placement`), the cores work on different lanes at once. On a 2-core
  CPU this trains the default study's lanes about 1.7x faster per step than
  one device (`experiments/benchmark.py` measures it).

  Acts only on JAX's CPU backend (`jax_num_cpu_devices`); GPU and TPU
  devices are untouched. Must run before JAX first uses a device: later, or
  when XLA_FLAGS already sets --xla_force_host_platform_device_count, the
  device count is left as it is. Returns the count set, or None.
  """
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return None
  n_lanes = config.seeds * max(1, len(config.optim.lr_grid))
  n = cpu_device_count(config.train.cpu_devices, n_lanes, host_cores())
  try:
    jax.config.update('jax_num_cpu_devices', n)
  except RuntimeError:  # the backend is up already (a notebook, a test)
    return None
  return n


def initialize_distributed(config) -> None:
  """Joins a multi-host job (TPU pods, multi-node GPU) when asked to.

  `jax.distributed.initialize()` finds the coordinator from the TPU or
  cluster environment. Every process runs the same command; the lanes are
  split over all devices of all hosts.
  """
  if config.train.distributed and not _distributed_state['done']:
    jax.distributed.initialize()
    _distributed_state['done'] = True
    logging.info(
        'Process %d of %d joined the job',
        jax.process_index(),
        jax.process_count(),
    )


_distributed_state = {'done': False}


def is_writer() -> bool:
  """Whether this process writes results, reports and the manifest."""
  return jax.process_index() == 0
