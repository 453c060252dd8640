"""Text tokenizers for prompts: UTF-8 bytes, an HF tokenizer.json, or
class indices (class-conditional CAR: the prompt "207" is class 207)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class TextTokenizer(Protocol):
  """What CAR needs of a text tokenizer; ids exclude special tokens."""

  vocab_size: int
  pad_id: int
  bos_id: int | None
  eos_id: int | None

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids, ByT5's layout: pad 0, eos 1, unk 2, byte b at b + 3.

  Needs no file, so the embedded demo and the tests run offline.
  """

  pad_id = 0
  eos_id = 1
  unk_id = 2
  bos_id = None
  offset = 3
  vocab_size = 256 + offset

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"expected a str to encode, got {type(text).__name__}")
    return [b + self.offset for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(int(i) - self.offset for i in ids
                 if self.offset <= int(i) < self.vocab_size)
    # Truncation can cut a multi-byte character; show it rather than fail.
    return data.decode("utf-8", errors="replace")

  def __repr__(self):
    return "ByteTokenizer()"


class ClassTokenizer:
  """A class index as the one-id prompt of class-conditional CAR.

  encode("207") is [207]: the condition is a class, embedded by CAR's own
  class table rather than the LLM's vocabulary; the empty prompt (no ids)
  is unconditional, as a dropped text prompt is.
  """

  pad_id = 0  # masked out: any valid id
  bos_id = None
  eos_id = None

  def __init__(self, num_classes: int):
    if num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    self.vocab_size = num_classes

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"expected a str to encode, got {type(text).__name__}")
    if not text.strip():
      return []
    if not text.strip().isdigit() or int(text) >= self.vocab_size:
      raise ValueError(f"class-conditional prompt {text!r}: expected a class"
                       f" index in 0..{self.vocab_size - 1}")
    return [int(text)]

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(str(int(i)) for i in ids)

  def __repr__(self):
    return f"ClassTokenizer({self.vocab_size})"


CLASSES_PREFIX = "classes:"

# Looked up in order when a tokenizer.json names no padding token.
_PAD_TOKENS = ("<|endoftext|>", "<pad>", "[PAD]", "<|pad|>")
_EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
_BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")


class HFTokenizer:
  """A `tokenizers.Tokenizer` (e.g. Qwen3's tokenizer.json).

  encode() adds no special tokens: the prompt is followed by CAR's own
  begin-of-image embedding, and Qwen3 uses no BOS.
  """

  def __init__(self, tokenizer, path: str = ""):
    self._tok = tokenizer
    self.path = path
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    padding = tokenizer.padding
    pad = padding["pad_id"] if padding else self._find(_PAD_TOKENS)
    # Pads are masked out, so any valid id serves when none is named.
    self.pad_id = 0 if pad is None else pad
    self.eos_id = self._find(_EOS_TOKENS)
    self.bos_id = self._find(_BOS_TOKENS)

  @classmethod
  def from_file(cls, path: str) -> HFTokenizer:
    import tokenizers  # Only real-data runs need it.

    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"text tokenizer file {path!r} not found: expected an HF"
          " tokenizer.json (e.g. from a Qwen3 checkpoint directory) or"
          " 'bytes'")
    try:
      tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # The Rust side raises a bare Exception.
      raise ValueError(f"{path!r} is not a valid HF tokenizer.json: {e}"
                       ) from e
    return cls(tokenizer, path)

  def _find(self, candidates: Sequence[str]) -> int | None:
    for token in candidates:
      i = self._tok.token_to_id(token)
      if i is not None:
        return i
    return None

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"expected a str to encode, got {type(text).__name__}")
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def __repr__(self):
    return f"HFTokenizer({self.path!r})"


def load_text_tokenizer(spec: str) -> TextTokenizer:
  """'bytes' -> ByteTokenizer; 'classes:N' -> ClassTokenizer(N); a
  tokenizer.json (or its directory) -> HFTokenizer."""
  if spec == "bytes":
    return ByteTokenizer()
  if spec.startswith(CLASSES_PREFIX):
    n = spec[len(CLASSES_PREFIX):]
    if not n.isdigit():
      raise ValueError(f"text tokenizer {spec!r}: expected 'classes:N' with"
                       " N the number of classes")
    return ClassTokenizer(int(n))
  if not spec:
    raise ValueError("text tokenizer spec is empty: expected 'bytes' or the"
                     " path of an HF tokenizer.json")
  return HFTokenizer.from_file(spec)


def encode_padded(tokenizer: TextTokenizer, text: str, max_len: int, *,
                  truncate: bool) -> tuple[np.ndarray, np.ndarray]:
  """One prompt -> (ids [max_len] int32, mask [max_len] int32), left-padded.

  CAR left-pads so the image tokens sit at the same positions in every row.
  Longer prompts keep their first max_len ids with truncate, else raise.
  """
  if max_len <= 0:
    raise ValueError(f"max text length must be positive, got {max_len}")
  ids = tokenizer.encode(text)
  if len(ids) > max_len:
    if not truncate:
      shown = text if len(text) <= 60 else text[:57] + "..."
      raise ValueError(
          f"prompt {shown!r} is {len(ids)} tokens, more than the maximum"
          f" text length {max_len}: shorten it or raise max_text_len")
    ids = ids[:max_len]
  out = np.full((max_len,), tokenizer.pad_id, np.int32)
  mask = np.zeros((max_len,), np.int32)
  if ids:
    out[-len(ids):] = ids
    mask[-len(ids):] = 1
  return out, mask


def batch_encode(tokenizer: TextTokenizer, texts: Sequence[str],
                 max_len: int, *, truncate: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Prompts -> (ids [B, max_len] int32, mask [B, max_len] int32).

  truncate=True for training data; False for sampling, where a silently
  cut prompt would give an image of something else.
  """
  if isinstance(texts, str):
    raise TypeError("expected a sequence of prompts, got a single str")
  rows = [encode_padded(tokenizer, t, max_len, truncate=truncate)
          for t in texts]
  if not rows:
    empty = np.zeros((0, max_len), np.int32)
    return empty, empty.copy()
  ids, mask = zip(*rows, strict=True)
  return np.stack(ids), np.stack(mask)


def decode_padded(tokenizer: TextTokenizer, ids: np.ndarray,
                  mask: np.ndarray) -> str:
  """Inverse of encode_padded (up to truncation)."""
  return tokenizer.decode(np.asarray(ids)[np.asarray(mask) > 0].tolist())
