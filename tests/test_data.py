"""Tests for the tokenizer, packing, the three sources and the caches.

Expected values come from arrays written out by hand or from the split rule
recomputed here (sha256 of the key, first 8 bytes over 2**64), not from the
module under test.
"""

import ast
import glob
import hashlib
import json
import os
import platform
import random
import sysconfig

import ml_collections
import numpy as np
import pytest

from ctsft_jax import data
from ctsft_jax import errors

BOS, SEP, EOS, PAD = 257, 258, 259, 256


def make_config(**overrides) -> ml_collections.ConfigDict:
  values = dict(
      source='synthetic',
      path='',
      seq_len=16,
      max_prompt_tokens=8,
      eval_fraction=0.1,
      max_eval_examples=256,
      synthetic_examples=300,
      unrelated_key='the loader must ignore this',
  )
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def hashed_to_eval(key: str, eval_fraction: float) -> bool:
  digest = hashlib.sha256(key.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64 < eval_fraction


def write_lines(path, lines) -> str:
  path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
  return str(path)


def test_token_ids():
  assert (data.PAD, data.BOS, data.SEP, data.EOS) == (PAD, BOS, SEP, EOS)
  assert data.VOCAB_SIZE == 260
  assert data.encode('aé') == [97, 0xC3, 0xA9]


def test_decode_inverts_encode_on_unicode():
  text = 'naïve café — 東京 🚀\n\ttab'
  assert data.decode(data.encode(text)) == text


def test_decode_skips_special_tokens():
  assert data.decode([BOS, 104, 105, SEP, 33, EOS, PAD, PAD]) == 'hi!'


def test_pack_matches_hand_written_rows():
  split = data.pack(
      [('ab', 'c'), ('abcd', 'xyz'), ('abcdefgh', 'q')],
      seq_len=6,
      max_prompt_tokens=2,
  )
  # Row 0: [BOS a b SEP c EOS PAD]; row 1: prompt cut to 'ab', sequence cut
  # to 7 tokens; row 2: prompt cut to 'ab'.
  np.testing.assert_array_equal(
      split.inputs,
      [
          [BOS, 97, 98, SEP, 99, EOS],
          [BOS, 97, 98, SEP, 120, 121],
          [BOS, 97, 98, SEP, 113, EOS],
      ],
  )
  np.testing.assert_array_equal(
      split.targets,
      [
          [97, 98, SEP, 99, EOS, PAD],
          [97, 98, SEP, 120, 121, 122],
          [97, 98, SEP, 113, EOS, PAD],
      ],
  )
  np.testing.assert_array_equal(
      split.weights,
      [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]],
  )
  assert split.inputs.dtype == np.int32 and split.targets.dtype == np.int32
  assert split.weights.dtype == np.float32


def test_pack_drops_examples_without_a_response_target():
  split = data.pack(
      [('abcdef', 'x'), ('a', 'x')], seq_len=4, max_prompt_tokens=10
  )
  # 'abcdef' fills all 5 tokens [BOS a b c d]; only ('a', 'x') is kept.
  np.testing.assert_array_equal(split.inputs, [[BOS, 97, SEP, 120]])
  np.testing.assert_array_equal(split.weights, [[0, 0, 1, 1]])


def test_weights_are_one_exactly_on_response_and_eos_targets():
  rng = random.Random(0)
  examples = [
      (
          ''.join(rng.choice('xyzé') for _ in range(rng.randint(0, 12))),
          ''.join(rng.choice('abc\n') for _ in range(rng.randint(0, 20))),
      )
      for _ in range(200)
  ]
  seq_len, max_prompt_tokens = 16, 6
  split = data.pack(
      examples, seq_len=seq_len, max_prompt_tokens=max_prompt_tokens
  )
  assert len(split.inputs) == len(examples)  # The prompt never fills a row.
  for row, (prompt, response) in enumerate(examples):
    kept_prompt = list(prompt.encode())[:max_prompt_tokens]
    first = len(kept_prompt) + 1  # Target index of the first response token.
    expected = (list(response.encode()) + [EOS])[: seq_len - first]
    weighted = split.weights[row] == 1.0
    np.testing.assert_array_equal(split.targets[row][weighted], expected)
    assert weighted.sum() == len(expected)
    assert split.inputs[row, first] == SEP
    assert set(np.unique(split.weights[row])) <= {0.0, 1.0}


def test_read_jsonl_reads_prompts_and_responses(tmp_path):
  path = write_lines(
      tmp_path / 'ok.jsonl',
      [
          '{"prompt": "p1", "response": "r1"}',
          '   ',
          '{"prompt": "é", "response": "", "extra": 3}',
      ],
  )
  assert data.read_jsonl(path) == [('p1', 'r1'), ('é', '')]


@pytest.mark.parametrize(
    'third_line, complaint',
    [
        ('{"prompt": "p", "response": ', 'not valid JSON'),
        ('{"prompt": "p"}', "'response'"),
        ('{"prompt": 3, "response": "r"}', "'prompt'"),
        ('["p", "r"]', 'not a JSON object'),
    ],
)
def test_read_jsonl_names_file_and_line_of_a_bad_line(
    tmp_path, third_line, complaint
):
  good = '{"prompt": "p", "response": "r"}'
  path = write_lines(tmp_path / 'bad.jsonl', [good, good, third_line, good])
  with pytest.raises(errors.UserError) as raised:
    data.read_jsonl(path)
  message = str(raised.value)
  assert path in message and 'line 3' in message and complaint in message
  assert '\n' not in message


def test_read_jsonl_rejects_missing_and_empty_files(tmp_path):
  missing = str(tmp_path / 'missing.jsonl')
  with pytest.raises(errors.UserError, match='does not exist'):
    data.read_jsonl(missing)
  for name, text in (('empty.jsonl', ''), ('blank.jsonl', '\n  \n')):
    (tmp_path / name).write_text(text)
    with pytest.raises(errors.UserError, match='holds no examples'):
      data.read_jsonl(str(tmp_path / name))


def test_load_sft_jsonl_splits_every_example_by_its_hash(tmp_path):
  examples = [(f'prompt {i}', f'response {i}') for i in range(200)]
  path = write_lines(
      tmp_path / 'sft.jsonl',
      [f'{{"prompt": "{p}", "response": "{r}"}}' for p, r in examples],
  )
  config = make_config(
      source='jsonl',
      path=path,
      seq_len=32,
      max_prompt_tokens=16,
      eval_fraction=0.3,
  )
  dataset = data.load_sft(config, cache_dir=None)
  assert dataset.info['cached'] is False and dataset.info['path'] == path
  # The split key of an example is json.dumps([prompt, response]).
  expected_eval = data.pack(
      [e for e in examples if hashed_to_eval(json.dumps(list(e)), 0.3)],
      seq_len=32,
      max_prompt_tokens=16,
  )
  assert 20 < len(expected_eval.inputs) < 100
  assert {row.tobytes() for row in dataset.eval.inputs} == {
      row.tobytes() for row in expected_eval.inputs
  }
  assert dataset.info['n_train'] + dataset.info['n_eval'] == len(examples)


def test_load_sft_jsonl_reports_missing_file(tmp_path):
  config = make_config(source='jsonl', path=str(tmp_path / 'nope.jsonl'))
  with pytest.raises(errors.UserError, match='nope.jsonl does not exist'):
    data.load_sft(config, cache_dir=str(tmp_path))


def test_synthetic_examples_reverse_their_prompt_deterministically():
  examples = data.synthetic_examples(500, seed=3)
  assert examples == data.synthetic_examples(500, seed=3)
  assert examples != data.synthetic_examples(500, seed=4)
  for prompt, response in examples:
    assert response == ''.join(reversed(prompt))
    assert 3 <= len(prompt) <= 8 and set(prompt) <= set('abcdefgh')


def test_load_sft_synthetic_caps_eval_and_keeps_splits_disjoint():
  config = make_config(eval_fraction=0.5, max_eval_examples=7)
  dataset = data.load_sft(config, cache_dir=None)
  assert dataset.info['n_eval'] == len(dataset.eval.inputs) == 7
  assert dataset.info['n_train'] == len(dataset.train.inputs) > 100
  train_rows = {row.tobytes() for row in dataset.train.inputs}
  assert not any(row.tobytes() in train_rows for row in dataset.eval.inputs)
  assert dataset.train.inputs.shape[1] == 16
  assert dataset.info['response_tokens_train'] == dataset.train.weights.sum()


@pytest.mark.parametrize(
    'override, named',
    [
        (dict(source='wiki'), 'data.source'),
        (dict(seq_len=0), 'data.seq_len'),
        (dict(max_prompt_tokens=15), 'data.max_prompt_tokens'),
        (dict(eval_fraction=1.0), 'data.eval_fraction'),
        (dict(source='jsonl', path=''), 'data.path'),
        (dict(synthetic_examples=0), 'data.synthetic_examples'),
    ],
)
def test_load_sft_rejects_bad_config_values(override, named):
  with pytest.raises(errors.UserError, match=named):
    data.load_sft(make_config(**override), cache_dir=None)


def test_cache_is_reused_and_stores_no_pickles(tmp_path):
  cache_dir = str(tmp_path)
  first = data.load_sft(make_config(), cache_dir=cache_dir)
  second = data.load_sft(make_config(), cache_dir=cache_dir)
  assert first.info['cached'] is False and second.info['cached'] is True
  for name in ('train', 'eval'):
    for field in ('inputs', 'targets', 'weights'):
      np.testing.assert_array_equal(
          getattr(getattr(first, name), field),
          getattr(getattr(second, name), field),
      )
  assert second.info['sha256'] == first.info['sha256']
  (cache_file,) = glob.glob(os.path.join(cache_dir, 'data', '*.npz'))
  with np.load(cache_file, allow_pickle=False) as npz:
    np.testing.assert_array_equal(npz['train_inputs'], first.train.inputs)
  digest = hashlib.sha256()
  for split in (first.train, first.eval):
    for array in (split.inputs, split.targets, split.weights):
      digest.update(array.tobytes())
  assert first.info['sha256'] == digest.hexdigest()


def test_cache_key_follows_the_config_and_damage_forces_a_rebuild(tmp_path):
  cache_dir = str(tmp_path)
  data.load_sft(make_config(), cache_dir=cache_dir)
  longer = data.load_sft(make_config(seq_len=20), cache_dir=cache_dir)
  assert longer.info['cached'] is False
  assert longer.train.inputs.shape[1] == 20
  cache_files = glob.glob(os.path.join(cache_dir, 'data', '*.npz'))
  assert len(cache_files) == 2
  for cache_file in cache_files:
    with open(cache_file, 'wb') as f:
      f.write(b'not a zip file')
  rebuilt = data.load_sft(make_config(), cache_dir=cache_dir)
  assert rebuilt.info['cached'] is False
  assert data.load_sft(make_config(), cache_dir=cache_dir).info['cached']


def test_no_cache_dir_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert data.load_sft(make_config(), cache_dir=None).info['cached'] is False
  assert not os.listdir(tmp_path)


@pytest.fixture(scope='module')
def stdlib_examples():
  return data.stdlib_examples()


@pytest.fixture(scope='module')
def stdlib_dataset(tmp_path_factory):
  cache_dir = str(tmp_path_factory.mktemp('cache'))
  config = make_config(
      source='stdlib', seq_len=64, max_prompt_tokens=32, eval_fraction=0.1
  )
  return data.load_sft(config, cache_dir=cache_dir), config, cache_dir


def test_stdlib_examples_are_documented_functions(stdlib_examples):
  assert len(stdlib_examples) > 1000
  files = {relpath for relpath, _, _ in stdlib_examples}
  assert 'json/decoder.py' in files
  assert not any(
      part in {'test', 'tests', 'idle_test', 'site-packages'}
      for relpath in files
      for part in relpath.split('/')
  )
  for relpath, prompt, response in stdlib_examples:
    assert prompt.startswith(('def ', 'async def ')), (relpath, prompt)
    (function,) = ast.parse(prompt).body  # Header plus docstring alone.
    assert isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
    assert len(function.body) == 1 and isinstance(
        function.body[0].value, ast.Constant
    )
    assert ast.parse(response).body, (relpath, response)  # Dedented code.


def test_stdlib_examples_are_deterministic(stdlib_examples):
  assert data.stdlib_examples() == stdlib_examples


def test_stdlib_split_is_by_file(stdlib_dataset, stdlib_examples):
  dataset, config, _ = stdlib_dataset
  packed = data.pack(
      [(prompt, response) for _, prompt, response in stdlib_examples],
      seq_len=64,
      max_prompt_tokens=32,
  )
  files_of_row = {}
  for (relpath, _, _), row in zip(stdlib_examples, packed.inputs, strict=True):
    files_of_row.setdefault(row.tobytes(), set()).add(relpath)
  for split, wanted in ((dataset.train, False), (dataset.eval, True)):
    for row in split.inputs:
      files = files_of_row[row.tobytes()]
      assert any(hashed_to_eval(f, 0.1) == wanted for f in files), files
  assert dataset.info['n_eval'] == config.max_eval_examples
  assert dataset.info['n_train'] > 1000
  for key in ('source', 'n_train', 'n_eval', 'seq_len', 'tokenizer'):
    assert key in dataset.info
  assert dataset.info['python_version'] == platform.python_version()


def test_stdlib_dataset_loads_from_cache(stdlib_dataset):
  dataset, config, cache_dir = stdlib_dataset
  again = data.load_sft(config, cache_dir=cache_dir)
  assert again.info['cached'] is True
  np.testing.assert_array_equal(again.eval.targets, dataset.eval.targets)
  assert again.info['sha256'] == dataset.info['sha256']


def train_and_eval_text() -> tuple[bytes, bytes]:
  """All stdlib `.py` bytes of train-hashed and eval-hashed files."""
  root = sysconfig.get_paths()['stdlib']
  blobs = {False: [], True: []}
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = [d for d in subdirs if d != 'site-packages']
    for name in sorted(names):
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        relpath = os.path.relpath(path, root).replace(os.sep, '/')
        with open(path, 'rb') as f:
          blobs[hashed_to_eval(relpath, 0.1)].append(f.read())
  return b'\0'.join(blobs[False]), b'\0'.join(blobs[True])


def test_pretrain_corpus_holds_no_eval_file_text(tmp_path):
  config = make_config(source='stdlib', seq_len=128, eval_fraction=0.1)
  corpus = data.load_pretrain_corpus(
      config, cache_dir=str(tmp_path), max_windows=500
  )
  assert corpus.inputs.shape == (500, 128)
  np.testing.assert_array_equal(corpus.inputs[:, 1:], corpus.targets[:, :-1])
  np.testing.assert_array_equal(corpus.weights, 1.0)
  train_text, eval_text = train_and_eval_text()
  windows = np.concatenate([corpus.inputs, corpus.targets[:, -1:]], axis=1)
  checked = 0
  for window in windows[::5]:
    # A window may span two files; EOS (259) marks where one ends.
    for piece in np.split(window, np.flatnonzero(window == EOS)):
      text = bytes(piece[piece < 256].astype(np.uint8))
      if len(text) >= 48:
        assert text in train_text, text
        checked += 1
  assert checked > 50
  # The check has teeth: text cut from eval files is mostly not found.
  eval_pieces = [
      eval_text[start : start + 128].split(b'\0')[0]
      for start in range(0, len(eval_text) - 128, len(eval_text) // 100)
  ]
  found = [piece in train_text for piece in eval_pieces if len(piece) >= 48]
  assert len(found) > 50 and sum(found) < len(found) / 4
  cached = data.load_pretrain_corpus(
      config, cache_dir=str(tmp_path), max_windows=500
  )
  np.testing.assert_array_equal(cached.inputs, corpus.inputs)
