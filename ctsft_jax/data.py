"""Offline SFT data: a byte tokenizer, three example sources and packed splits.

Every example is a (prompt, response) pair of strings. It is tokenized as
UTF-8 bytes and packed into one row of `seq_len` tokens:

  [BOS] prompt[:max_prompt_tokens] [SEP] response [EOS] [PAD] ...

The loss counts only the targets that come after SEP (the response bytes and
the EOS that ends them), so a model is graded on responses alone.

Sources (`data.source`):
  stdlib     functions of the running interpreter's standard library, parsed
             with `ast`: prompt = the `def` header and its docstring, response
             = the rest of the body. Files are split into train and eval as a
             whole, by a hash of their path, so that the pretraining corpus
             (`load_pretrain_corpus`, train files only) never sees an eval
             function.
  jsonl      a file of {"prompt": ..., "response": ...} objects, one a line.
  synthetic  reverse a short random string; a tiny model learns it in about a
             hundred steps, which makes it the source for fast tests.
  hf:<name>  a Hugging Face dataset, a `save_to_disk` directory or a data
             file, read by `hf_data` (optional extra `hf`); split by the hash
             of each example like jsonl.

Nothing is downloaded, except by an `hf:` source naming a Hub dataset.
Packed arrays are cached as `.npz` files (never pickles) under
`{cache_dir}/data/`.

`data.tokenizer='bpe'` replaces the byte tokenizer by a byte-level BPE that
`bpe` trains on the training split (optional extra `bpe`); it is cached next
to the arrays and the dataset info reports its `vocab_size`.
"""

import ast
import contextlib
import dataclasses
import hashlib
import io
import json
import numbers
import os
import platform
import random
import sysconfig
import tempfile
import time
import zipfile

from absl import logging
import numpy as np

from ctsft_jax import bpe
from ctsft_jax import errors
from ctsft_jax import hf_data

# Token ids: bytes are 0..255, then four special tokens.
PAD = 256
BOS = 257
SEP = 258
EOS = 259
VOCAB_SIZE = 260

# Bump when packing or extraction changes, so that old cache files are unused.
FORMAT_VERSION = 1
SOURCES = ('stdlib', 'synthetic', 'jsonl')  # and 'hf:<dataset>'
TOKENIZERS = ('bytes', 'bpe')
# Stdlib functions with a docstring are used alone if there are this many;
# otherwise functions without one join them (prompt = the header alone).
MIN_DOCSTRING_EXAMPLES = 4000
SYNTHETIC_SEED = 0
SYNTHETIC_ALPHABET = 'abcdefgh'
SYNTHETIC_LENGTHS = (3, 8)  # Inclusive range of the prompt length in letters.

# Directories of the standard library that hold no library code to learn from.
_SKIPPED_DIRS = frozenset(
    {
        '__pycache__',
        'dist-packages',
        'idle_test',
        'site-packages',
        'test',
        'testing',
        'tests',
    }
)
_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Split:
  """Packed rows of one split; row i of each array is one example."""

  inputs: np.ndarray  # [N, T] int32 token ids fed to the model.
  targets: np.ndarray  # [N, T] int32 next-token ids.
  weights: np.ndarray  # [N, T] float32, 1.0 where the target counts.


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and eval splits plus a JSON-serialisable description."""

  train: Split
  eval: Split
  info: dict


@dataclasses.dataclass(frozen=True)
class _SftSettings:
  """The keys of the data config that `load_sft` reads, validated."""

  source: str
  path: str
  seq_len: int
  max_prompt_tokens: int
  eval_fraction: float
  max_eval_examples: int
  synthetic_examples: int
  tokenizer: str = 'bytes'  # 'bytes' or 'bpe'
  bpe_vocab_size: int = 0  # most ids of the BPE, specials included
  hf: hf_data.HfSettings | None = None  # for an 'hf:' source


def encode(text: str) -> list[int]:
  """Token ids of `text`: its UTF-8 bytes."""
  return list(text.encode('utf-8'))


def decode(ids) -> str:
  """Text of byte ids; special tokens are skipped, bad UTF-8 is replaced."""
  data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
  return data.decode('utf-8', errors='replace')


def pack(
    examples: list[tuple[str, str]],
    *,
    seq_len: int,
    max_prompt_tokens: int,
    tokenizer: bpe.BpeTokenizer | None = None,
) -> Split:
  """Packs (prompt, response) pairs into rows of `seq_len` tokens.

  Examples whose response gets no weighted target (the prompt fills the row)
  are dropped, so the result may have fewer rows than `examples`.

  Args:
    examples: (prompt, response) pairs.
    seq_len: tokens per row, T.
    max_prompt_tokens: prompt tokens kept, counted from the start.
    tokenizer: a BPE tokenizer (with its own special ids); None packs bytes.

  Returns:
    A Split whose weights are 1.0 exactly on response and final EOS targets.
  """
  if seq_len < 1 or max_prompt_tokens < 0:
    raise errors.UserError(
        f'seq_len={seq_len}, max_prompt_tokens={max_prompt_tokens}; expected'
        ' seq_len >= 1 and max_prompt_tokens >= 0'
    )
  pad, bos, sep, eos = PAD, BOS, SEP, EOS
  if tokenizer is not None:
    pad, bos, sep, eos = (
        tokenizer.pad,
        tokenizer.bos,
        tokenizer.sep,
        tokenizer.eos,
    )
  rows = np.full((len(examples), seq_len + 1), pad, np.int32)
  weights = np.zeros((len(examples), seq_len), np.float32)
  kept = 0
  for prompt, response in examples:
    prompt_ids = _token_prefix(prompt, max_prompt_tokens, tokenizer)
    response_ids = _token_prefix(response, seq_len, tokenizer)
    sequence = [bos, *prompt_ids, sep, *response_ids, eos][: seq_len + 1]
    first_response = len(prompt_ids) + 2  # Index in `sequence`.
    if first_response >= len(sequence):
      continue
    rows[kept, : len(sequence)] = sequence
    # Target t is sequence[t + 1], so response targets start one earlier.
    weights[kept, first_response - 1 : len(sequence) - 1] = 1.0
    kept += 1
  return Split(
      inputs=rows[:kept, :-1].copy(),
      targets=rows[:kept, 1:].copy(),
      weights=weights[:kept],
  )


def _token_prefix(text: str, n: int, tokenizer) -> list[int]:
  """The first `n` token ids of `text`: bytes, or BPE pieces."""
  if tokenizer is None:
    return list(text.encode('utf-8')[:n])
  return tokenizer.encode(text)[:n]


def synthetic_examples(n: int, *, seed: int) -> list[tuple[str, str]]:
  """`n` string-reversal examples: prompt 'abd', response 'dba'."""
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise errors.UserError(
        f'data.synthetic_examples={n!r}; expected a positive integer'
    )
  rng = random.Random(seed)
  low, high = SYNTHETIC_LENGTHS
  examples = []
  for _ in range(n):
    letters = ''.join(
        rng.choice(SYNTHETIC_ALPHABET) for _ in range(rng.randint(low, high))
    )
    examples.append((letters, letters[::-1]))
  return examples


def read_jsonl(path: str) -> list[tuple[str, str]]:
  """Reads (prompt, response) pairs from a JSONL file; blank lines skipped.

  Raises:
    errors.UserError: the file is missing, unreadable or holds no examples, or
      a line is not a JSON object with string fields `prompt` and `response`.
  """
  expected = 'expected one {"prompt": str, "response": str} object a line'
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.readlines()
  except FileNotFoundError:
    raise errors.UserError(
        f'data.path={path} does not exist; {expected}'
    ) from None
  except (OSError, UnicodeDecodeError) as e:
    raise errors.UserError(
        f'data.path={path} cannot be read as UTF-8 text ({e}); {expected}'
    ) from None
  examples = []
  for line_number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f'data.path={path} line {line_number}'
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise errors.UserError(
          f'{where}: not valid JSON ({e.msg}); {expected}'
      ) from None
    if not isinstance(record, dict):
      raise errors.UserError(f'{where}: not a JSON object; {expected}')
    for field in ('prompt', 'response'):
      if not isinstance(record.get(field), str):
        raise errors.UserError(
            f'{where}: field {field!r} is missing or not a string; {expected}'
        )
    examples.append((record['prompt'], record['response']))
  if not examples:
    raise errors.UserError(f'data.path={path} holds no examples; {expected}')
  return examples


def stdlib_root() -> str:
  """The running interpreter's standard library directory."""
  return sysconfig.get_paths()['stdlib']


def stdlib_files(root: str) -> list[str]:
  """Sorted POSIX paths, relative to `root`, of the library's `.py` files.

  Tests (directories such as `test`, `tests`, `idle_test`, `test_*`, and files
  named `test_*.py`) and installed packages (`site-packages`) are left out.
  """
  relpaths = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = [d for d in subdirs if not _is_skipped_dir(d)]
    for name in names:
      if not name.endswith('.py') or _is_test_file(name):
        continue
      relpath = os.path.relpath(os.path.join(directory, name), root)
      relpaths.append(relpath.replace(os.sep, '/'))
  return sorted(relpaths)


def _is_skipped_dir(name: str) -> bool:
  return (
      name in _SKIPPED_DIRS
      or name.startswith('test_')
      or name.endswith('_test')
  )


def _is_test_file(name: str) -> bool:
  return (
      name.startswith('test_')
      or name.endswith('_test.py')
      or name == 'conftest.py'
  )


def _read_text(path: str) -> str | None:
  """The file's UTF-8 text, or None if it cannot be read or decoded."""
  try:
    with open(path, 'rb') as f:
      return f.read().decode('utf-8')
  except (OSError, UnicodeDecodeError):
    return None


def stdlib_examples() -> list[tuple[str, str, str]]:
  """(source file relpath, prompt, response) for standard library functions.

  Covers `def` and `async def`, methods and nested functions included, in
  sorted file order and source order within a file. The prompt is the header
  from `def` (decorators left out) plus the docstring, as written and dedented
  by the header's indentation; the response is the rest of the body, dedented
  by its own indentation. Functions whose body is only a docstring are
  skipped; bodies such as a lone `pass` or `...` are kept, since they are code
  a model should learn to write. Files that fail to decode or parse are
  skipped.
  """
  root = stdlib_root()
  examples = []  # (relpath, prompt, response, has_docstring)
  for relpath in stdlib_files(root):
    source = _read_text(os.path.join(root, relpath))
    if source is None:
      continue
    for prompt, response, has_docstring in _function_examples(source):
      examples.append((relpath, prompt, response, has_docstring))
  documented = [example[:3] for example in examples if example[3]]
  if len(documented) >= MIN_DOCSTRING_EXAMPLES:
    return documented
  return [example[:3] for example in examples]


def _function_examples(source: str) -> list[tuple[str, str, bool]]:
  """(prompt, response, has_docstring) for every function in `source`."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError, RecursionError):
    return []
  # Line numbers from `ast` count only \n, \r\n and \r as line breaks.
  lines = io.StringIO(source, newline='').readlines()
  nodes = [
      node
      for node in ast.walk(tree)
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
  ]
  nodes.sort(key=lambda node: (node.lineno, node.col_offset))
  examples = []
  for node in nodes:
    example = _function_example(lines, node)
    if example is not None:
      examples.append(example)
  return examples


def _function_example(lines, node) -> tuple[str, str, bool] | None:
  """Splits one function into (prompt, response, has_docstring), or None.

  None when the body is only a docstring, or when the first statement after
  the docstring does not start its own line (as in `def f(): return 1`).
  """
  has_docstring = ast.get_docstring(node, clean=False) is not None
  rest = node.body[1:] if has_docstring else node.body
  if not rest or not _starts_line(lines, rest[0]):
    return None
  if has_docstring:
    prompt_end = node.body[0].end_lineno  # 1-based last line of docstring.
  else:
    prompt_end = rest[0].lineno - 1
  header_indent = _indent(lines[node.lineno - 1])
  prompt = _strip_indent(lines[node.lineno - 1 : prompt_end], header_indent)
  if not prompt.startswith(('def ', 'async def ')):
    return None
  body_indent = _indent(lines[rest[0].lineno - 1])
  response = _strip_indent(lines[prompt_end : node.end_lineno], body_indent)
  return prompt, response, has_docstring


def _starts_line(lines, statement) -> bool:
  """Whether only whitespace precedes `statement` on its first line."""
  line = lines[statement.lineno - 1].encode('utf-8')
  return not line[: statement.col_offset].strip()


def _indent(line: str) -> str:
  return line[: len(line) - len(line.lstrip(' \t'))]


def _strip_indent(lines: list[str], indent: str) -> str:
  """Joins `lines`, removing `indent` from those that start with it.

  Lines indented less (such as the inside of a multi-line string) are kept
  as written.
  """
  return ''.join(
      line[len(indent) :] if line.startswith(indent) else line for line in lines
  )


def _hash_fraction(key: str) -> float:
  """A number in [0, 1) fixed by `key`: the sha256's first 8 bytes / 2**64."""
  digest = hashlib.sha256(key.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64


def is_eval(key: str, eval_fraction: float) -> bool:
  """Whether the file or example named by `key` belongs to the eval split."""
  return _hash_fraction(key) < eval_fraction


def _example_key(prompt: str, response: str) -> str:
  """An unambiguous string naming one example, for hashing."""
  return json.dumps([prompt, response])


def load_sft(data_config, *, cache_dir: str | None) -> Dataset:
  """Builds, or loads from the cache, the packed train and eval splits.

  An example goes to eval when the sha256 of its key, read as a fraction of
  2**64, falls below `data.eval_fraction`. The key is the file's path relative
  to the stdlib root for stdlib (so files split whole), and
  `json.dumps([prompt, response])` otherwise. The eval examples are sorted by
  the hash of that JSON and cut to `data.max_eval_examples` rows, so eval is
  the same fixed set on every run.

  With `data.tokenizer='bpe'`, a BPE tokenizer is trained on the train
  examples (after the split) and cached as `{cache_dir}/data/bpe-*.json`,
  keyed by the train text's source and `data.bpe_vocab_size` only, so other
  seq_len or eval sizes reuse it. `info['tokenizer_file']` names it.

  Args:
    data_config: a ConfigDict with the keys `source`, `path`, `seq_len`,
      `max_prompt_tokens`, `eval_fraction`, `max_eval_examples` and
      `synthetic_examples`, and optionally `tokenizer`, `bpe_vocab_size` and
      (for an `hf:` source) `hf_split`, `hf_prompt_field`,
      `hf_response_field`, `hf_subset`; other keys are ignored.
    cache_dir: the packed arrays are cached under `{cache_dir}/data/`; None
      builds them afresh and writes nothing.

  Returns:
    The splits, and an `info` dict describing them (`cached` tells whether
    they came from the cache).

  Raises:
    errors.UserError: a bad config value or JSONL file, or no training
      examples.
  """
  settings = _sft_settings(data_config)
  fields = _sft_cache_fields(settings)
  path = _cache_path(cache_dir, 'sft', fields)
  if path is not None:
    dataset = _load_sft_cache(path)
    if dataset is not None:
      logging.info('Loaded SFT data from %s: %s', path, _summary(dataset))
      return dataset
  start = time.perf_counter()
  tokenizer_path = None
  if settings.tokenizer == 'bpe':
    tokenizer_path = _cache_path(
        cache_dir, 'bpe', _bpe_cache_fields(fields), suffix='.json'
    )
  dataset = _build_sft(settings, tokenizer_path)
  dataset.info['build_seconds'] = round(time.perf_counter() - start, 3)
  dataset.info['cache_file'] = path or ''
  if path is not None:
    _save_sft_cache(path, dataset)
  logging.info(
      'Built SFT data in %.1f s: %s',
      dataset.info['build_seconds'],
      _summary(dataset),
  )
  return dataset


def check_model_vocab(vocab_size: int, info: dict) -> None:
  """Raises a UserError if `model.vocab_size` cannot hold the data's ids."""
  needed = info.get('vocab_size', VOCAB_SIZE)
  if vocab_size < needed:
    raise errors.UserError(
        f'model.vocab_size={vocab_size} is below the {needed} token ids of the'
        f" data's {info.get('tokenizer', 'bytes')} tokenizer; set"
        f' model.vocab_size={needed} or more'
    )


def _summary(dataset: Dataset) -> str:
  info = dataset.info
  return (
      f"source={info['source']} train={info['n_train']} eval={info['n_eval']}"
      f" rows of {info['seq_len']} tokens,"
      f" {info['response_tokens_train']} train response tokens"
  )


def _config_value(data_config, key: str, default=_REQUIRED):
  value = data_config.get(key, default)
  if value is _REQUIRED:
    raise errors.UserError(
        f'data.{key} is missing; the data config must set it'
    )
  return value


def _check_int(name: str, value, minimum: int) -> int:
  is_integer = isinstance(value, numbers.Integral) and not isinstance(
      value, bool
  )
  if not is_integer or value < minimum:
    raise errors.UserError(
        f'{name}={value!r}; expected an integer >= {minimum}'
    )
  return int(value)


def _check_fraction(name: str, value) -> float:
  if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Real)
      or not 0 <= value < 1
  ):
    raise errors.UserError(f'{name}={value!r}; expected a number in [0, 1)')
  return float(value)


def _sft_settings(data_config) -> _SftSettings:
  """Reads and validates the keys `load_sft` uses."""
  source = _config_value(data_config, 'source', 'stdlib')
  if source not in SOURCES and not hf_data.is_hf_source(source):
    raise errors.UserError(
        f'data.source={source!r}; expected one of {", ".join(SOURCES)} or'
        " 'hf:<dataset>'"
    )
  path = _config_value(data_config, 'path', '') or ''
  if source == 'jsonl' and not path:
    raise errors.UserError(
        "data.path='' with data.source='jsonl'; expected a JSONL file's path"
    )
  seq_len = _check_int('data.seq_len', _config_value(data_config, 'seq_len'), 2)
  max_prompt_tokens = _check_int(
      'data.max_prompt_tokens',
      _config_value(data_config, 'max_prompt_tokens'),
      0,
  )
  if max_prompt_tokens > seq_len - 2:
    raise errors.UserError(
        f'data.max_prompt_tokens={max_prompt_tokens} leaves no room for a'
        f' response in data.seq_len={seq_len}; expected at most {seq_len - 2}'
    )
  hf = None
  if hf_data.is_hf_source(source):
    hf = hf_data.settings(data_config)
  synthetic = 0
  if source == 'synthetic':
    synthetic = _check_int(
        'data.synthetic_examples',
        _config_value(data_config, 'synthetic_examples'),
        1,
    )
  return _SftSettings(
      source=source,
      path=path if source == 'jsonl' else '',
      seq_len=seq_len,
      max_prompt_tokens=max_prompt_tokens,
      eval_fraction=_check_fraction(
          'data.eval_fraction', _config_value(data_config, 'eval_fraction')
      ),
      max_eval_examples=_check_int(
          'data.max_eval_examples',
          _config_value(data_config, 'max_eval_examples'),
          0,
      ),
      synthetic_examples=synthetic,
      **_tokenizer_settings(data_config),
      hf=hf,
  )


def _tokenizer_settings(data_config) -> dict:
  """`tokenizer` and `bpe_vocab_size`, checked; bytes when unset."""
  tokenizer = _config_value(data_config, 'tokenizer', 'bytes')
  if tokenizer not in TOKENIZERS:
    raise errors.UserError(
        f'data.tokenizer={tokenizer!r}; expected one of {", ".join(TOKENIZERS)}'
    )
  if tokenizer == 'bytes':
    return dict(tokenizer=tokenizer)
  vocab_size = _config_value(data_config, 'bpe_vocab_size')
  return dict(
      tokenizer=tokenizer, bpe_vocab_size=bpe.check_vocab_size(vocab_size)
  )


def _sft_cache_fields(settings: _SftSettings) -> dict:
  """Everything the packed arrays depend on; its hash names the cache file."""
  fields = {
      'kind': 'sft',
      'format_version': FORMAT_VERSION,
      'source': settings.source,
      'seq_len': settings.seq_len,
      'max_prompt_tokens': settings.max_prompt_tokens,
      'eval_fraction': settings.eval_fraction,
      'max_eval_examples': settings.max_eval_examples,
  }
  if settings.source == 'jsonl':
    fields['path'] = os.path.abspath(settings.path)
    fields['content_sha256'] = _file_sha256(settings.path)
  elif settings.source == 'synthetic':
    fields['synthetic_examples'] = settings.synthetic_examples
    fields['synthetic_seed'] = SYNTHETIC_SEED
  elif settings.hf is not None:
    fields.update(hf_data.cache_fields(settings.hf))
  else:
    fields['python_version'] = platform.python_version()
    fields['stdlib_root'] = stdlib_root()
    fields['min_docstring_examples'] = MIN_DOCSTRING_EXAMPLES
  if settings.tokenizer != 'bytes':
    # Absent for bytes, so that byte-level cache files keep their names.
    fields['tokenizer'] = settings.tokenizer
    fields['bpe_vocab_size'] = settings.bpe_vocab_size
    fields['bpe_format_version'] = bpe.FORMAT_VERSION
    fields['tokenizers_version'] = bpe.library_version()
  return fields


def _bpe_cache_fields(sft_fields: dict) -> dict:
  """The fields that fix the train text and the BPE; not seq_len and such."""
  packing_only = ('kind', 'seq_len', 'max_prompt_tokens', 'max_eval_examples')
  fields = {k: v for k, v in sft_fields.items() if k not in packing_only}
  return {'kind': 'bpe', **fields}


def _file_sha256(path: str) -> str:
  try:
    with open(path, 'rb') as f:
      return hashlib.sha256(f.read()).hexdigest()
  except OSError:
    read_jsonl(path)  # Raises the UserError that explains what is wrong.
    raise


def _build_sft(
    settings: _SftSettings, tokenizer_path: str | None = None
) -> Dataset:
  """Extracts, splits and packs the examples of `settings.source`.

  With a BPE tokenizer, `tokenizer_path` is its cache file (None: no cache).
  """
  train_examples, eval_examples, extra_info = _split_examples(settings)
  eval_examples.sort(key=lambda example: _hash_fraction(_example_key(*example)))
  tokenizer, tokenizer_info = None, {}
  if settings.tokenizer == 'bpe':
    tokenizer, cached = bpe.load_or_train(
        train_examples,
        vocab_size=settings.bpe_vocab_size,
        path=tokenizer_path,
    )
    tokenizer_info = {
        'vocab_size': tokenizer.vocab_size,
        'bpe_vocab_size': settings.bpe_vocab_size,
        'tokenizer_file': tokenizer_path or '',
        'tokenizer_cached': cached,
    }
  shape = dict(
      seq_len=settings.seq_len,
      max_prompt_tokens=settings.max_prompt_tokens,
      tokenizer=tokenizer,
  )
  train = pack(train_examples, **shape)
  held_out = pack(eval_examples, **shape)
  held_out = Split(
      inputs=held_out.inputs[: settings.max_eval_examples],
      targets=held_out.targets[: settings.max_eval_examples],
      weights=held_out.weights[: settings.max_eval_examples],
  )
  if not len(train.inputs):
    raise errors.UserError(
        f'data.source={settings.source} gave no training examples with'
        f' data.eval_fraction={settings.eval_fraction}; expected a source with'
        ' more examples or a smaller eval_fraction'
    )
  info = {
      'source': settings.source,
      'path': settings.path,
      'n_train': len(train.inputs),
      'n_eval': len(held_out.inputs),
      'seq_len': settings.seq_len,
      'max_prompt_tokens': settings.max_prompt_tokens,
      'eval_fraction': settings.eval_fraction,
      'max_eval_examples': settings.max_eval_examples,
      'tokenizer': settings.tokenizer,
      'vocab_size': VOCAB_SIZE,
      'python_version': platform.python_version(),
      'format_version': FORMAT_VERSION,
      'sha256': _digest(train, held_out),
      'response_tokens_train': int(np.count_nonzero(train.weights)),
      'response_tokens_eval': int(np.count_nonzero(held_out.weights)),
      'cached': False,
      **extra_info,
      **tokenizer_info,
  }
  return Dataset(train=train, eval=held_out, info=info)


def _split_examples(settings: _SftSettings):
  """Train and eval (prompt, response) lists, and source-specific info."""
  if settings.source == 'stdlib':
    return _split_stdlib(settings.eval_fraction)
  if settings.source == 'jsonl':
    examples = read_jsonl(settings.path)
  elif settings.hf is not None:
    examples = hf_data.read_examples(settings.hf)
  else:
    examples = synthetic_examples(
        settings.synthetic_examples, seed=SYNTHETIC_SEED
    )
  train, held_out = [], []
  for example in examples:
    if is_eval(_example_key(*example), settings.eval_fraction):
      held_out.append(example)
    else:
      train.append(example)
  info = {'n_examples': len(examples)}
  if settings.hf is not None:
    info.update(hf_data.describe(settings.hf))
  return train, held_out, info


def _split_stdlib(eval_fraction: float):
  """Splits stdlib functions by the hash of their file's path."""
  examples = stdlib_examples()
  train, held_out = [], []
  train_files, eval_files = set(), set()
  for relpath, prompt, response in examples:
    if is_eval(relpath, eval_fraction):
      held_out.append((prompt, response))
      eval_files.add(relpath)
    else:
      train.append((prompt, response))
      train_files.add(relpath)
  # The same function text can sit in a train file and an eval file (copied
  # helpers, one-line dunder methods); such eval examples are dropped so that
  # eval measures code the model was not trained on.
  seen_in_train = set(train)
  unseen = [example for example in held_out if example not in seen_in_train]
  info = {
      'n_examples': len(examples),
      'n_files_train': len(train_files),
      'n_files_eval': len(eval_files),
      'eval_copies_of_train_dropped': len(held_out) - len(unseen),
      'stdlib_root': stdlib_root(),
  }
  return train, unseen, info


def _digest(*splits: Split) -> str:
  """sha256 over inputs, targets and weights of each split, in that order."""
  digest = hashlib.sha256()
  for split in splits:
    for array in (split.inputs, split.targets, split.weights):
      digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def _save_sft_cache(path: str, dataset: Dataset) -> None:
  arrays = {}
  for name, split in (('train', dataset.train), ('eval', dataset.eval)):
    for field in dataclasses.fields(Split):
      arrays[f'{name}_{field.name}'] = getattr(split, field.name)
  arrays['info_json'] = np.array(json.dumps(dataset.info))
  _write_npz(path, arrays)


def _load_sft_cache(path: str) -> Dataset | None:
  """The cached Dataset, or None if the file is missing or damaged."""
  arrays = _read_npz(path)
  if arrays is None:
    return None
  try:
    splits = [_split_from_arrays(arrays, name) for name in ('train', 'eval')]
    info = json.loads(str(arrays['info_json']))
  except (KeyError, ValueError) as e:
    logging.warning('Rebuilding %s: it lacks a field (%s)', path, e)
    return None
  if _digest(*splits) != info.get('sha256'):
    logging.warning('Rebuilding %s: its arrays do not match their sha256', path)
    return None
  info['cached'] = True
  return Dataset(train=splits[0], eval=splits[1], info=info)


def _split_from_arrays(arrays: dict[str, np.ndarray], name: str) -> Split:
  return Split(
      inputs=arrays[f'{name}_inputs'],
      targets=arrays[f'{name}_targets'],
      weights=arrays[f'{name}_weights'],
  )


def load_pretrain_corpus(
    data_config, *, cache_dir: str | None, max_windows: int
) -> Split:
  """Language-modelling windows over the train-split stdlib source files.

  The raw bytes of every stdlib file in the train split (same path hash and
  `data.eval_fraction` as `load_sft`), each followed by EOS, are concatenated
  and cut into non-overlapping windows of `data.seq_len + 1` tokens. If there
  are more than `max_windows`, an evenly spaced subset of that many is kept.
  Eval files never contribute, so eval functions stay unseen.

  NOTE: a function copied verbatim into a train file still reaches the
  corpus; `load_sft` drops such exact copies from eval, but near-copies (a
  renamed helper, say) are not detected.

  Returns:
    A Split with inputs = window[:-1], targets = window[1:], weights all 1.
  """
  seq_len = _check_int('data.seq_len', _config_value(data_config, 'seq_len'), 2)
  eval_fraction = _check_fraction(
      'data.eval_fraction', _config_value(data_config, 'eval_fraction')
  )
  max_windows = _check_int('max_windows', max_windows, 1)
  fields = {
      'kind': 'pretrain',
      'format_version': FORMAT_VERSION,
      'seq_len': seq_len,
      'eval_fraction': eval_fraction,
      'max_windows': max_windows,
      'python_version': platform.python_version(),
      'stdlib_root': stdlib_root(),
  }
  path = _cache_path(cache_dir, 'pretrain', fields)
  windows = None if path is None else _load_windows_cache(path)
  if windows is None:
    start = time.perf_counter()
    windows = _build_windows(seq_len, eval_fraction, max_windows)
    logging.info(
        'Built %d pretraining windows of %d tokens in %.1f s',
        len(windows),
        seq_len,
        time.perf_counter() - start,
    )
    if path is not None:
      _write_npz(path, {'windows': windows, 'sha256': _windows_digest(windows)})
  windows = windows.astype(np.int32)
  return Split(
      inputs=windows[:, :-1].copy(),
      targets=windows[:, 1:].copy(),
      weights=np.ones((len(windows), seq_len), np.float32),
  )


def _build_windows(
    seq_len: int, eval_fraction: float, max_windows: int
) -> np.ndarray:
  """[N, seq_len + 1] uint16 windows over the train-split stdlib files."""
  root = stdlib_root()
  end_of_file = np.array([EOS], np.uint16)
  pieces = []
  for relpath in stdlib_files(root):
    if is_eval(relpath, eval_fraction):
      continue
    text = _read_text(os.path.join(root, relpath))
    if text is not None:
      pieces += [np.frombuffer(text.encode('utf-8'), np.uint8), end_of_file]
  tokens = np.concatenate([np.zeros(0, np.uint16), *pieces]).astype(np.uint16)
  n_windows = len(tokens) // (seq_len + 1)
  if n_windows == 0:
    raise errors.UserError(
        f'data.seq_len={seq_len} needs {seq_len + 1} tokens a window but the'
        f' pretraining corpus has {len(tokens)}; expected a smaller seq_len'
        ' or data.eval_fraction'
    )
  windows = tokens[: n_windows * (seq_len + 1)].reshape(n_windows, -1)
  if n_windows > max_windows:
    windows = windows[np.arange(max_windows) * n_windows // max_windows]
  return np.ascontiguousarray(windows)


def _windows_digest(windows: np.ndarray) -> np.ndarray:
  return np.array(hashlib.sha256(windows.tobytes()).hexdigest())


def _load_windows_cache(path: str) -> np.ndarray | None:
  arrays = _read_npz(path)
  if arrays is None:
    return None
  windows = arrays.get('windows')
  stored_digest = str(arrays.get('sha256'))
  if windows is None or stored_digest != str(_windows_digest(windows)):
    logging.warning('Rebuilding %s: missing or damaged windows', path)
    return None
  logging.info('Loaded %d pretraining windows from %s', len(windows), path)
  return windows


def _cache_path(
    cache_dir: str | None, kind: str, fields: dict, suffix: str = '.npz'
) -> str | None:
  """`{cache_dir}/data/{kind}-{hash of fields}.npz`, or None without a dir."""
  if cache_dir is None:
    return None
  key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
  return os.path.join(cache_dir, 'data', f'{kind}-{key[:20]}{suffix}')


def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes `arrays` to `path` atomically: a temp file, then a rename."""
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  handle, temp_path = tempfile.mkstemp(dir=directory, suffix='.npz.tmp')
  try:
    with os.fdopen(handle, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(temp_path, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(temp_path)
    raise


def _read_npz(path: str) -> dict[str, np.ndarray] | None:
  """All arrays of an `.npz` (no pickles), or None if missing or unreadable."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {name: npz[name] for name in npz.files}
  except FileNotFoundError:
    return None
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    logging.warning('Rebuilding %s: it cannot be read (%s)', path, e)
    return None
