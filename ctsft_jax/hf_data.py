"""Hugging Face datasets as SFT examples: `data.source='hf:<dataset>'`.

`<dataset>` is read with the `datasets` library (the optional extra `hf`):

  a directory   written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`
                (`load_from_disk`; a DatasetDict gives its `data.hf_split`)
  a data file   ending .json, .jsonl, .csv or .parquet
                (`load_dataset(<format>, data_files=...)`; the file is the
                one split, so `data.hf_split` is not used)
  anything else a dataset on the Hub, 'owner/name'
                (`load_dataset(name, data.hf_subset, split=data.hf_split)`)

Two columns become the example: `data.hf_prompt_field` and
`data.hf_response_field`, both strings. Rows where either is None are
skipped. The examples then take the same path as local data in `data`: the
split into train and eval by hash, packing and the `.npz` cache.

The cache key holds the sha256 of a local dataset's files, or, for a Hub
dataset, the fingerprint `datasets` gives the loaded split (it changes when
the downloaded files change). Computing it opens the dataset, so a cached
run still needs the dataset where `datasets` can find it (for the Hub: its
own cache, offline or not).
"""

import hashlib
import importlib
import os
from typing import NamedTuple

from absl import logging

from ctsft_jax import errors

PREFIX = 'hf:'
# data_files suffix -> the `datasets` builder that reads it.
FILE_BUILDERS = {
    '.json': 'json',
    '.jsonl': 'json',
    '.csv': 'csv',
    '.parquet': 'parquet',
}
DEFAULTS = {
    'hf_split': 'train',
    'hf_prompt_field': 'prompt',
    'hf_response_field': 'response',
    'hf_subset': '',
}


class HfSettings(NamedTuple):
  """Where the examples come from and which columns they are."""

  dataset: str  # what follows 'hf:' in data.source
  split: str  # the split read; train and eval are both cut from it
  prompt_field: str  # column of the prompt text
  response_field: str  # column of the response text
  subset: str  # the Hub dataset's configuration name; '' for its default


def is_hf_source(source) -> bool:
  return isinstance(source, str) and source.startswith(PREFIX)


def settings(data_config) -> HfSettings:
  """Reads and checks the `hf_*` keys; missing keys take `DEFAULTS`."""
  dataset = data_config.get('source', '')[len(PREFIX) :]
  if not dataset:
    raise errors.UserError(
        f"data.source='{PREFIX}' names no dataset; expected"
        " 'hf:owner/name', 'hf:/path/to/saved_dir' or 'hf:/path/to/file.jsonl'"
    )
  values = {}
  for key, default in DEFAULTS.items():
    value = data_config.get(key, default)
    if not isinstance(value, str) or (not value and key != 'hf_subset'):
      raise errors.UserError(
          f'data.{key}={value!r}; expected a non-empty string'
      )
    values[key] = value
  return HfSettings(
      dataset=dataset,
      split=values['hf_split'],
      prompt_field=values['hf_prompt_field'],
      response_field=values['hf_response_field'],
      subset=values['hf_subset'],
  )


def _datasets(hf: HfSettings):
  """The `datasets` module, or a one-line UserError saying what to install."""
  try:
    return importlib.import_module('datasets')
  except ImportError:
    raise errors.UserError(
        f'data.source=hf:{hf.dataset} needs the datasets package; run `pip'
        " install datasets` (or `pip install -e '.[hf]'`)"
    ) from None


def _local_kind(dataset: str) -> str | None:
  """'dir' or 'file' for a local dataset, None for a Hub name."""
  if os.path.isdir(dataset):
    return 'dir'
  if os.path.isfile(dataset):
    return 'file'
  return None


def _first_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0]


def open_split(hf: HfSettings):
  """The `datasets.Dataset` of the configured split.

  Raises:
    errors.UserError: `datasets` is missing, the dataset cannot be found or
      reached, or it has no such split.
  """
  datasets = _datasets(hf)
  try:
    loaded = _load(datasets, hf)
  except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
    raise errors.UserError(
        f'data.source=hf:{hf.dataset} could not be loaded ({_first_line(e)});'
        " expected a Hub dataset 'owner/name' (run once online, or log in"
        ' with `hf auth login` for a gated one; HF_HUB_OFFLINE=1 and'
        ' HF_DATASETS_OFFLINE=1 allow only what is cached), a save_to_disk'
        f' directory, or a {"/".join(FILE_BUILDERS)} file'
    ) from None
  if isinstance(loaded, datasets.DatasetDict):
    if hf.split not in loaded:
      raise errors.UserError(
          f'data.hf_split={hf.split!r} is not a split of hf:{hf.dataset};'
          f' expected one of {", ".join(sorted(loaded))}'
      )
    loaded = loaded[hf.split]
  return loaded


def _load(datasets, hf: HfSettings):
  kind = _local_kind(hf.dataset)
  if kind == 'dir':
    return datasets.load_from_disk(hf.dataset)
  if kind == 'file':
    suffix = os.path.splitext(hf.dataset)[1].lower()
    if suffix not in FILE_BUILDERS:
      raise ValueError(f'no reader for {suffix or "files without a suffix"}')
    return datasets.load_dataset(
        FILE_BUILDERS[suffix], data_files=hf.dataset, split='train'
    )
  return datasets.load_dataset(hf.dataset, hf.subset or None, split=hf.split)


def _files_sha256(path: str) -> str:
  """sha256 over the relative names and bytes of every file under `path`."""
  digest = hashlib.sha256()
  if os.path.isfile(path):
    names = ['']
  else:
    names = sorted(
        os.path.relpath(os.path.join(root, name), path)
        for root, _, files in os.walk(path)
        for name in files
    )
  for name in names:
    digest.update(name.encode('utf-8') + b'\0')
    with open(os.path.join(path, name) if name else path, 'rb') as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        digest.update(block)
  return digest.hexdigest()


def cache_fields(hf: HfSettings) -> dict:
  """What the packed arrays depend on, beyond the shared data keys."""
  fields = {
      'hf_dataset': hf.dataset,
      'hf_split': hf.split,
      'hf_prompt_field': hf.prompt_field,
      'hf_response_field': hf.response_field,
      'hf_subset': hf.subset,
  }
  if _local_kind(hf.dataset):
    fields['hf_dataset'] = os.path.abspath(hf.dataset)
    fields['content_sha256'] = _files_sha256(hf.dataset)
  else:
    # NOTE: `_fingerprint` is private in `datasets` but the only stable
    # name it gives to the content of a downloaded split.
    fields['fingerprint'] = getattr(open_split(hf), '_fingerprint')
  return fields


def read_examples(hf: HfSettings) -> list[tuple[str, str]]:
  """(prompt, response) pairs of the split, in its order.

  Raises:
    errors.UserError: a field is not a column, or holds a value that is
      neither a string nor None.
  """
  split = open_split(hf)
  for key, field in (
      ('hf_prompt_field', hf.prompt_field),
      ('hf_response_field', hf.response_field),
  ):
    if field not in split.column_names:
      raise errors.UserError(
          f'data.{key}={field!r} is not a column of hf:{hf.dataset} split'
          f' {hf.split}; expected one of {", ".join(split.column_names)}'
      )
  prompts = split[hf.prompt_field]
  responses = split[hf.response_field]
  examples, skipped = [], 0
  for row, (prompt, response) in enumerate(zip(prompts, responses)):
    if prompt is None or response is None:
      skipped += 1
      continue
    for key, value in (
        ('hf_prompt_field', prompt),
        ('hf_response_field', response),
    ):
      if not isinstance(value, str):
        raise errors.UserError(
            f'hf:{hf.dataset} row {row}: data.{key} holds a'
            f' {type(value).__name__}; expected a string column (map chat'
            ' messages to text first)'
        )
    examples.append((prompt, response))
  if skipped:
    logging.warning(
        'hf:%s: skipped %d rows whose prompt or response is None',
        hf.dataset,
        skipped,
    )
  return examples


def describe(hf: HfSettings) -> dict:
  """Dataset info entries naming the source."""
  return {
      'hf_dataset': hf.dataset,
      'hf_split': hf.split,
      'hf_subset': hf.subset,
      'hf_prompt_field': hf.prompt_field,
      'hf_response_field': hf.response_field,
  }
