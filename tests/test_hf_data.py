"""Tests for `data.source='hf:...'`: datasets made on the fly, never the Hub.

The reference for every packed array is the same examples written as a JSONL
file and loaded through the local `jsonl` source.
"""

import json
import os
import sys

import datasets
import huggingface_hub
import ml_collections
import numpy as np
import pytest

from ctsft_jax import data
from ctsft_jax import errors

EXAMPLES = [(f'question {i}?', f'answer number {i}.') for i in range(120)]


@pytest.fixture(autouse=True)
def offline_and_private_cache(monkeypatch, tmp_path):
  """No Hub access, and `datasets` caches under the test's tmp dir.

  Both libraries read the offline variables once, at import, so their
  constants are patched as well as the environment.
  """
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(
      datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'hf_cache')
  )


def make_config(source: str, **overrides) -> ml_collections.ConfigDict:
  values = dict(
      source=source,
      path='',
      seq_len=32,
      max_prompt_tokens=16,
      eval_fraction=0.25,
      max_eval_examples=64,
      synthetic_examples=1,
      hf_split='train',
      hf_prompt_field='question',
      hf_response_field='answer',
      hf_subset='',
  )
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def save_dir(tmp_path, name, examples, **columns) -> str:
  rows = [{'question': p, 'answer': r, **columns} for p, r in examples]
  path = str(tmp_path / name)
  datasets.Dataset.from_list(rows).save_to_disk(path)
  return path


def jsonl_reference(tmp_path, examples) -> data.Dataset:
  path = tmp_path / 'reference.jsonl'
  path.write_text(
      ''.join(
          json.dumps({'prompt': p, 'response': r}) + '\n' for p, r in examples
      )
  )
  return data.load_sft(make_config('jsonl', path=str(path)), cache_dir=None)


def assert_same_splits(got: data.Dataset, want: data.Dataset) -> None:
  for name in ('train', 'eval'):
    for field in ('inputs', 'targets', 'weights'):
      np.testing.assert_array_equal(
          getattr(getattr(got, name), field),
          getattr(getattr(want, name), field),
      )


def test_saved_dataset_packs_like_the_same_jsonl(tmp_path):
  path = save_dir(tmp_path, 'saved', EXAMPLES, extra=1)
  got = data.load_sft(make_config(f'hf:{path}'), cache_dir=None)
  want = jsonl_reference(tmp_path, EXAMPLES)
  assert 10 < got.info['n_eval'] < 60
  assert_same_splits(got, want)
  assert got.info['source'] == f'hf:{path}'
  assert got.info['hf_prompt_field'] == 'question'
  assert got.info['n_examples'] == len(EXAMPLES)


def test_json_lines_file_goes_through_load_dataset(tmp_path):
  path = tmp_path / 'pairs.jsonl'
  path.write_text(
      ''.join(
          json.dumps({'q': p, 'a': r, 'id': i}) + '\n'
          for i, (p, r) in enumerate(EXAMPLES)
      )
  )
  config = make_config(f'hf:{path}', hf_prompt_field='q', hf_response_field='a')
  got = data.load_sft(config, cache_dir=None)
  assert_same_splits(got, jsonl_reference(tmp_path, EXAMPLES))


def test_dataset_dict_split_is_chosen_by_hf_split(tmp_path):
  rows = lambda examples: [{'question': p, 'answer': r} for p, r in examples]
  path = str(tmp_path / 'dict')
  datasets.DatasetDict(
      train=datasets.Dataset.from_list(rows(EXAMPLES[:5])),
      test=datasets.Dataset.from_list(rows(EXAMPLES[5:])),
  ).save_to_disk(path)
  got = data.load_sft(
      make_config(f'hf:{path}', hf_split='test'), cache_dir=None
  )
  assert got.info['n_examples'] == len(EXAMPLES) - 5
  assert_same_splits(got, jsonl_reference(tmp_path, EXAMPLES[5:]))
  with pytest.raises(errors.UserError, match="hf_split='dev'.*test, train"):
    data.load_sft(make_config(f'hf:{path}', hf_split='dev'), cache_dir=None)


def test_cache_is_reused_and_follows_the_content(tmp_path):
  cache_dir = str(tmp_path / 'cache')
  path = save_dir(tmp_path, 'saved', EXAMPLES)
  config = make_config(f'hf:{path}')
  assert data.load_sft(config, cache_dir=cache_dir).info['cached'] is False
  again = data.load_sft(config, cache_dir=cache_dir)
  assert again.info['cached'] is True
  changed = EXAMPLES[:-1] + [('a new question?', 'a new answer.')]
  save_dir(tmp_path, 'saved_tmp', changed)
  os.rename(path, str(tmp_path / 'old'))
  os.rename(str(tmp_path / 'saved_tmp'), path)
  rebuilt = data.load_sft(config, cache_dir=cache_dir)
  assert rebuilt.info['cached'] is False
  assert rebuilt.info['sha256'] != again.info['sha256']


def test_rows_without_text_are_skipped(tmp_path):
  rows = [{'question': p, 'answer': r} for p, r in EXAMPLES]
  rows[3]['answer'] = None
  rows[7]['question'] = None
  path = str(tmp_path / 'gaps')
  datasets.Dataset.from_list(rows).save_to_disk(path)
  got = data.load_sft(make_config(f'hf:{path}'), cache_dir=None)
  kept = [e for i, e in enumerate(EXAMPLES) if i not in (3, 7)]
  assert got.info['n_examples'] == len(kept)
  assert_same_splits(got, jsonl_reference(tmp_path, kept))


def test_bpe_tokenizer_works_on_hf_data(tmp_path):
  path = save_dir(tmp_path, 'saved', EXAMPLES)
  config = make_config(f'hf:{path}', tokenizer='bpe', bpe_vocab_size=300)
  got = data.load_sft(config, cache_dir=str(tmp_path / 'cache'))
  assert got.info['tokenizer'] == 'bpe' and got.info['vocab_size'] <= 300
  assert (
      got.info['n_eval'] == jsonl_reference(tmp_path, EXAMPLES).info['n_eval']
  )


@pytest.mark.parametrize(
    'override, complaint',
    [
        (dict(hf_prompt_field='prompt'), "hf_prompt_field='prompt'.*answer"),
        (dict(hf_response_field=''), 'hf_response_field'),
    ],
)
def test_bad_field_names_name_the_key(tmp_path, override, complaint):
  path = save_dir(tmp_path, 'saved', EXAMPLES[:10])
  with pytest.raises(errors.UserError, match=complaint):
    data.load_sft(make_config(f'hf:{path}', **override), cache_dir=None)


def test_non_string_column_is_an_error(tmp_path):
  rows = [{'question': p, 'answer': len(r)} for p, r in EXAMPLES[:10]]
  path = str(tmp_path / 'numbers')
  datasets.Dataset.from_list(rows).save_to_disk(path)
  with pytest.raises(errors.UserError, match='row 0.*holds a int'):
    data.load_sft(make_config(f'hf:{path}'), cache_dir=None)


def one_line_user_error(config) -> str:
  with pytest.raises(errors.UserError) as raised:
    data.load_sft(config, cache_dir=None)
  message = str(raised.value)
  assert '\n' not in message
  return message


def test_unreachable_hub_dataset_says_what_to_do():
  message = one_line_user_error(
      make_config('hf:no-such-owner/no-such-dataset-ctsft')
  )
  assert 'hf:no-such-owner/no-such-dataset-ctsft could not be loaded' in message
  assert 'HF_HUB_OFFLINE' in message and 'hf auth login' in message


def test_empty_dataset_name_is_an_error():
  assert 'names no dataset' in one_line_user_error(make_config('hf:'))


def test_unreadable_file_type_is_an_error(tmp_path):
  path = tmp_path / 'pairs.txt'
  path.write_text('question? answer.\n')
  message = one_line_user_error(make_config(f'hf:{path}'))
  assert 'no reader for .txt' in message


def test_missing_datasets_package_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'datasets', None)
  message = one_line_user_error(make_config('hf:owner/name'))
  assert 'pip install datasets' in message
