"""Tests for the BPE tokenizer and packing with it.

Expected rows are rebuilt here from the tokenizer's piece ids and the
layout [BOS] prompt [SEP] response [EOS] [PAD]..., not taken from `pack`.
"""

import os
import random
import sys

import ml_collections
import numpy as np
import pytest

from ctsft_jax import bpe
from ctsft_jax import data
from ctsft_jax import errors

WORDS = (
    'the model learns to reverse short strings of letters while the base'
    ' stays frozen and only the low rank factors train on every step'
).split()


def sentences(n: int, seed: int) -> list[str]:
  rng = random.Random(seed)
  return [' '.join(rng.choice(WORDS) for _ in range(12)) for _ in range(n)]


@pytest.fixture(scope='module')
def tokenizer():
  return bpe.train(sentences(400, seed=0), vocab_size=400)


def make_config(**overrides) -> ml_collections.ConfigDict:
  values = dict(
      source='synthetic',
      path='',
      seq_len=16,
      max_prompt_tokens=8,
      eval_fraction=0.1,
      max_eval_examples=64,
      synthetic_examples=300,
      tokenizer='bpe',
      bpe_vocab_size=300,
  )
  values.update(overrides)
  return ml_collections.ConfigDict(values)


@pytest.mark.parametrize(
    'text',
    [
        '',
        'plain ascii words',
        '  leading and trailing spaces  ',
        'naïve café — 東京 🚀\n\ttab\r\nline',
        '<eos> [PAD] <|endoftext|>',
        'def f(x):\n    return x[::-1]\n',
    ],
)
def test_decode_inverts_encode(tokenizer, text):
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert all(0 <= i < tokenizer.n_pieces for i in ids)


def test_special_ids_follow_the_pieces(tokenizer):
  n = tokenizer.n_pieces
  assert 256 < n <= 400 - 4
  assert (tokenizer.pad, tokenizer.bos, tokenizer.sep, tokenizer.eos) == (
      n,
      n + 1,
      n + 2,
      n + 3,
  )
  assert tokenizer.vocab_size == n + 4
  ids = tokenizer.encode('the model')
  assert tokenizer.decode([tokenizer.bos, *ids, tokenizer.eos]) == 'the model'


def test_trained_tokenizer_compresses_unseen_text(tokenizer):
  held_out = '\n'.join(sentences(50, seed=1))
  n_bytes = len(held_out.encode('utf-8'))
  n_tokens = len(tokenizer.encode(held_out))
  assert n_tokens < 0.5 * n_bytes, (n_tokens, n_bytes)


def test_pack_marks_response_and_eos_targets(tokenizer):
  rng = random.Random(0)
  examples = [
      (' '.join(rng.sample(WORDS, 3)), ' '.join(rng.sample(WORDS, k)))
      for k in range(0, 12)
  ]
  seq_len, max_prompt_tokens = 12, 4
  split = data.pack(
      examples,
      seq_len=seq_len,
      max_prompt_tokens=max_prompt_tokens,
      tokenizer=tokenizer,
  )
  assert len(split.inputs) == len(examples)
  for row, (prompt, response) in enumerate(examples):
    prompt_ids = tokenizer.encode(prompt)[:max_prompt_tokens]
    sequence = [
        tokenizer.bos,
        *prompt_ids,
        tokenizer.sep,
        *tokenizer.encode(response),
        tokenizer.eos,
    ][: seq_len + 1]
    sequence += [tokenizer.pad] * (seq_len + 1 - len(sequence))
    np.testing.assert_array_equal(split.inputs[row], sequence[:-1])
    np.testing.assert_array_equal(split.targets[row], sequence[1:])
    first = len(prompt_ids) + 1  # Target index of the first response token.
    expected = (tokenizer.encode(response) + [tokenizer.eos])[: seq_len - first]
    weighted = split.weights[row] == 1.0
    np.testing.assert_array_equal(split.targets[row][weighted], expected)
    assert weighted.sum() == len(expected)
    assert not weighted[:first].any()


def test_load_sft_caches_the_tokenizer_apart_from_the_arrays(tmp_path):
  cache_dir = str(tmp_path)
  first = data.load_sft(make_config(), cache_dir=cache_dir)
  path = first.info['tokenizer_file']
  assert first.info['tokenizer'] == 'bpe'
  assert first.info['tokenizer_cached'] is False and os.path.isfile(path)
  assert os.path.dirname(path) == os.path.join(cache_dir, 'data')
  assert first.info['vocab_size'] == bpe.load(path).vocab_size <= 300
  assert first.train.inputs.max() < first.info['vocab_size']
  mtime = os.stat(path).st_mtime_ns
  longer = data.load_sft(make_config(seq_len=20), cache_dir=cache_dir)
  assert longer.info['cached'] is False  # New arrays ...
  assert longer.info['tokenizer_cached'] is True  # ... same tokenizer.
  assert longer.info['tokenizer_file'] == path
  assert os.stat(path).st_mtime_ns == mtime
  again = data.load_sft(make_config(), cache_dir=cache_dir)
  assert again.info['cached'] is True
  np.testing.assert_array_equal(again.train.inputs, first.train.inputs)
  bigger = data.load_sft(make_config(bpe_vocab_size=320), cache_dir=cache_dir)
  assert bigger.info['tokenizer_file'] != path


def test_a_damaged_tokenizer_file_is_retrained(tmp_path):
  first = data.load_sft(make_config(), cache_dir=str(tmp_path))
  with open(first.info['tokenizer_file'], 'w') as f:
    f.write('{not json')
  os.remove(first.info['cache_file'])
  rebuilt = data.load_sft(make_config(), cache_dir=str(tmp_path))
  assert rebuilt.info['tokenizer_cached'] is False
  assert rebuilt.info['sha256'] == first.info['sha256']


def test_bpe_rows_differ_from_bytes_but_the_split_does_not():
  bytes_data = data.load_sft(make_config(tokenizer='bytes'), cache_dir=None)
  bpe_data = data.load_sft(make_config(), cache_dir=None)
  assert bytes_data.info['vocab_size'] == data.VOCAB_SIZE
  assert bpe_data.info['n_eval'] == bytes_data.info['n_eval']
  assert bpe_data.info['n_train'] == bytes_data.info['n_train']
  assert not np.array_equal(bpe_data.train.inputs, bytes_data.train.inputs)
  assert bpe_data.info['sha256'] != bytes_data.info['sha256']


def test_model_vocab_must_hold_the_tokenizer_ids():
  info = {'tokenizer': 'bpe', 'vocab_size': 300}
  with pytest.raises(errors.UserError, match='model.vocab_size=300 or more'):
    data.check_model_vocab(260, info)
  data.check_model_vocab(300, info)
  data.check_model_vocab(260, {'tokenizer': 'bytes', 'vocab_size': 260})


@pytest.mark.parametrize('vocab_size', [260, 0, 300.0, True])
def test_bad_vocab_size_names_the_key(vocab_size):
  with pytest.raises(errors.UserError, match='data.bpe_vocab_size'):
    data.load_sft(make_config(bpe_vocab_size=vocab_size), cache_dir=None)


def test_unknown_tokenizer_names_the_key():
  with pytest.raises(errors.UserError, match="data.tokenizer='wordpiece'"):
    data.load_sft(make_config(tokenizer='wordpiece'), cache_dir=None)


def test_missing_tokenizers_package_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tokenizers', None)
  with pytest.raises(errors.UserError) as raised:
    data.load_sft(make_config(), cache_dir=None)
  message = str(raised.value)
  assert 'pip install tokenizers' in message and '\n' not in message
