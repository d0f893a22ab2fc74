"""A byte-level BPE tokenizer, trained offline on the training split's text.

The byte tokenizer of `data` stays the default (`data.tokenizer='bytes'`).
With `data.tokenizer='bpe'`, `data.load_sft` trains this tokenizer with the
Hugging Face `tokenizers` library (the optional extra `bpe`) on the prompts
and responses of the training split, caches it as JSON next to the packed
arrays, and packs with it.

Ids follow the layout of the byte tokenizer, with BPE pieces in place of the
256 bytes:

  0 .. n-1   BPE pieces (the 256 byte symbols and n - 256 learned merges)
  n          PAD
  n + 1      BOS
  n + 2      SEP
  n + 3      EOS

so the model's vocabulary is n + 4 (`BpeTokenizer.vocab_size`, reported as
`vocab_size` in the dataset info). n + 4 never exceeds `data.bpe_vocab_size`;
it is smaller when the training text has fewer mergeable pairs. The special
tokens are not part of the BPE model, so text that happens to spell a special
token's name is encoded as ordinary text.

Pieces are byte-level (GPT-2 style): any text is encodable without an
unknown token and `decode(encode(text)) == text` for every string.
"""

import contextlib
import dataclasses
import importlib
import os
import tempfile
from typing import Any, Iterable

from absl import logging

from ctsft_jax import errors

N_SPECIAL = 4  # PAD, BOS, SEP, EOS, after the pieces
N_BYTES = 256  # byte symbols, always pieces
MIN_VOCAB_SIZE = N_BYTES + N_SPECIAL + 1  # at least one learned merge
MIN_PAIR_COUNT = 2  # a pair seen fewer times is never merged
FORMAT_VERSION = 1  # bump when training or the id layout changes


def _tokenizers():
  """The `tokenizers` module, or a one-line UserError saying what to install."""
  try:
    return importlib.import_module('tokenizers')
  except ImportError:
    raise errors.UserError(
        "data.tokenizer='bpe' needs the tokenizers package; run `pip install"
        " tokenizers` (or `pip install -e '.[bpe]'`), or set"
        " data.tokenizer='bytes'"
    ) from None


def library_version() -> str:
  """The installed `tokenizers` version, part of the cache key."""
  return _tokenizers().__version__


@dataclasses.dataclass(frozen=True)
class BpeTokenizer:
  """A trained byte-level BPE model and the special ids after its pieces."""

  model: Any  # tokenizers.Tokenizer, without special tokens

  @property
  def n_pieces(self) -> int:
    return self.model.get_vocab_size()

  @property
  def pad(self) -> int:
    return self.n_pieces

  @property
  def bos(self) -> int:
    return self.n_pieces + 1

  @property
  def sep(self) -> int:
    return self.n_pieces + 2

  @property
  def eos(self) -> int:
    return self.n_pieces + 3

  @property
  def vocab_size(self) -> int:
    return self.n_pieces + N_SPECIAL

  def encode(self, text: str) -> list[int]:
    """Piece ids of `text`; never a special id."""
    return self.model.encode(text).ids

  def decode(self, ids) -> str:
    """Text of piece ids; special ids are skipped."""
    pieces = [int(i) for i in ids if 0 <= int(i) < self.n_pieces]
    return self.model.decode(pieces)


def check_vocab_size(vocab_size) -> int:
  """`data.bpe_vocab_size` as an int, or a one-line UserError."""
  is_int = isinstance(vocab_size, int) and not isinstance(vocab_size, bool)
  if not is_int or vocab_size < MIN_VOCAB_SIZE:
    raise errors.UserError(
        f'data.bpe_vocab_size={vocab_size!r}; expected an integer >='
        f' {MIN_VOCAB_SIZE} (256 byte pieces + {N_SPECIAL} special tokens +'
        ' at least one merge)'
    )
  return vocab_size


def train(texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
  """Trains a byte-level BPE whose pieces plus specials fit `vocab_size`."""
  tokenizers = _tokenizers()
  vocab_size = check_vocab_size(vocab_size)
  byte_level = tokenizers.pre_tokenizers.ByteLevel
  model = tokenizers.Tokenizer(tokenizers.models.BPE())
  model.pre_tokenizer = byte_level(add_prefix_space=False, use_regex=True)
  model.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size - N_SPECIAL,
      min_frequency=MIN_PAIR_COUNT,
      initial_alphabet=byte_level.alphabet(),
      special_tokens=[],
      show_progress=False,
  )
  model.train_from_iterator(texts, trainer=trainer)
  return BpeTokenizer(model)


def save(tokenizer: BpeTokenizer, path: str) -> None:
  """Writes the tokenizer's JSON to `path` atomically."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, temp_path = tempfile.mkstemp(dir=directory, suffix='.json.tmp')
  try:
    with os.fdopen(handle, 'w', encoding='utf-8') as f:
      f.write(tokenizer.model.to_str())
    os.replace(temp_path, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(temp_path)
    raise


def load(path: str) -> BpeTokenizer | None:
  """The tokenizer saved at `path`, or None if it is missing or damaged."""
  tokenizers = _tokenizers()
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except FileNotFoundError:
    return None
  try:
    return BpeTokenizer(tokenizers.Tokenizer.from_str(text))
  except Exception as e:  # pylint: disable=broad-except
    # The library raises bare Exceptions for malformed JSON.
    logging.warning(
        'Retraining the tokenizer %s: it cannot be read (%s)', path, e
    )
    return None


def load_or_train(
    examples: list[tuple[str, str]], *, vocab_size: int, path: str | None
) -> tuple[BpeTokenizer, bool]:
  """The cached tokenizer at `path`, or one trained on `examples` and saved.

  Args:
    examples: the training split's (prompt, response) pairs; both texts of
      every pair are training text.
    vocab_size: `data.bpe_vocab_size`, the most ids including specials.
    path: the cache file; None trains afresh and writes nothing.

  Returns:
    (the tokenizer, whether it came from the cache).
  """
  if path is not None:
    tokenizer = load(path)
    if tokenizer is not None:
      logging.info(
          'Loaded a BPE tokenizer of %d pieces from %s',
          tokenizer.n_pieces,
          path,
      )
      return tokenizer, True
  texts = (text for example in examples for text in example)
  tokenizer = train(texts, vocab_size)
  logging.info(
      'Trained a BPE tokenizer: %d pieces (+%d specials) on %d examples',
      tokenizer.n_pieces,
      N_SPECIAL,
      len(examples),
  )
  if path is not None:
    save(tokenizer, path)
  return tokenizer, False
