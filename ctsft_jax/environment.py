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
