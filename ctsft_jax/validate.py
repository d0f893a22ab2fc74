"""Checks of a config before anything runs, each failing with one clear line."""

import ml_collections

from ctsft_jax import bpe
from ctsft_jax import budget as budget_lib
from ctsft_jax import data as data_lib
from ctsft_jax import errors
from ctsft_jax import hf_data
from ctsft_jax import lowrank
from ctsft_jax import optim

SCALING_RULES = ('standard', 'rslora', 'none')
BASE_KINDS = ('pretrained', 'random')
DATA_SOURCES = ('stdlib', 'jsonl', 'synthetic')
ATTENTION = ('einsum', 'dot_product_attention')
FACTOR_GRAD = ('custom', 'autodiff')


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise errors.UserError(message)


def _one_of(name: str, value, allowed) -> None:
  _require(value in allowed, f'{name}={value!r} is not one of {allowed}')


def _positive(name: str, value) -> None:
  _require(value > 0, f'{name}={value} must be > 0')


def check_cpu_devices(config: ml_collections.ConfigDict) -> None:
  """The values read before JAX starts: seeds and train.cpu_devices."""
  _positive('seeds', config.seeds)
  n = config.train.cpu_devices
  _require(
      isinstance(n, int) and n >= 0,
      f'train.cpu_devices={n!r} must be 0 (one per core) or a device count',
  )


def check_config(config: ml_collections.ConfigDict) -> int:
  """Raises UserError on the first bad value; returns the largest valid K."""
  m = config.model
  check_cpu_devices(config)
  for name in ('d_model', 'n_heads', 'n_layers', 'd_mlp', 'max_len'):
    _positive(f'model.{name}', m[name])
  _require(
      m.d_model % m.n_heads == 0,
      f'model.d_model={m.d_model} must be a multiple of model.n_heads='
      f'{m.n_heads}',
  )
  check_data_source(config)
  _one_of('model.dtype', m.dtype, ('float32', 'bfloat16'))
  _one_of('model.attention', m.attention, ATTENTION)
  _one_of('model.factor_grad', m.get('factor_grad', 'custom'), FACTOR_GRAD)
  _one_of('lowrank.scaling', config.lowrank.scaling, SCALING_RULES)
  _one_of('optim.schedule', config.optim.schedule, optim.SCHEDULES)
  _one_of('base.kind', config.base.kind, BASE_KINDS)
  _positive('optim.learning_rate', config.optim.learning_rate)
  _positive('data.batch_size', config.data.batch_size)
  _positive('data.seq_len', config.data.seq_len)
  _positive('train.eval_batch', config.train.eval_batch)
  _positive('train.chunk_steps', config.train.chunk_steps)
  _positive('budget.anchor_steps', config.budget.anchor_steps)
  _require(
      config.data.seq_len <= m.max_len,
      f'data.seq_len={config.data.seq_len} must be <= model.max_len='
      f'{m.max_len}',
  )
  if config.data.source == 'jsonl':
    _require(
        bool(config.data.path),
        'data.source=jsonl needs data.path, a JSONL file of prompt/response'
        ' lines',
    )
    data_lib.read_jsonl(config.data.path)  # names a bad file or line
  return check_ranks(config)


def check_data_source(config: ml_collections.ConfigDict) -> None:
  """The data source, the tokenizer and the model vocabulary agree."""
  source = config.data.source
  _require(
      source in DATA_SOURCES or hf_data.is_hf_source(source),
      f'data.source={source!r} is not one of {DATA_SOURCES} or'
      " 'hf:<dataset>'",
  )
  tokenizer = config.data.tokenizer
  _one_of('data.tokenizer', tokenizer, data_lib.TOKENIZERS)
  vocab = data_lib.VOCAB_SIZE
  if tokenizer == 'bpe':
    vocab = bpe.check_vocab_size(config.data.bpe_vocab_size)
    _require(
        config.base.kind == 'random',
        "data.tokenizer='bpe' needs base.kind='random'; the pretrained base is"
        ' byte-level',
    )
  _require(
      config.model.vocab_size >= vocab,
      f'model.vocab_size={config.model.vocab_size} must be >= {vocab}, the'
      f' {tokenizer} vocabulary',
  )


def _unique(name: str, values) -> None:
  repeated = sorted({v for v in values if list(values).count(v) > 1})
  _require(not repeated, f'{name} repeats {repeated}; list each value once')


def check_ranks(config: ml_collections.ConfigDict) -> int:
  studies = config.studies
  ranks = budget_lib.ranks_needed(studies)
  _require(bool(ranks), 'no study is enabled; enable one under studies.*')
  _unique('studies.budget_matched.ranks', studies.budget_matched.ranks)
  _unique(
      'studies.budget_multipliers.multipliers',
      studies.budget_multipliers.multipliers,
  )
  _unique('studies.crossover.high_steps', studies.crossover.high_steps)
  _require(
      not studies.wallclock_matched.enabled
      or (
          studies.budget_matched.enabled
          and config.budget.anchor_rank in studies.budget_matched.ranks
      ),
      'studies.wallclock_matched needs budget.anchor_rank='
      f'{config.budget.anchor_rank} among studies.budget_matched.ranks (its'
      ' seconds per step are measured); add it or disable wallclock_matched',
  )
  for k in ranks:
    _require(k > 0, f'K={k} must be a positive integer rank')
  max_rank = lowrank.max_rank(config.model, tuple(config.lowrank.targets))
  for k in ranks:
    _require(
        k <= max_rank,
        f'K={k} is above min(d_in, d_out)={max_rank} of the targeted layers;'
        f' use K <= {max_rank} or a wider model',
    )
  return max_rank


def differing_keys(old: dict, new: dict, prefix: str = '') -> list[str]:
  """Dotted names of the keys whose values differ between two config dicts."""
  keys = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    name = f'{prefix}{key}'
    if isinstance(a, dict) and isinstance(b, dict):
      keys += differing_keys(a, b, name + '.')
    elif a != b:
      keys.append(name)
  return keys
