"""Text tokenizers: bytes, an HF tokenizer.json, padding and truncation."""

import numpy as np
import pytest

from cvqcar.data import text

PROMPTS = ["a ginger tabby cat", "café crème ☕", "猫と珈琲", ""]


def test_byte_tokenizer_round_trips_utf8():
  tok = text.load_text_tokenizer("bytes")
  assert isinstance(tok, text.ByteTokenizer)
  for prompt in PROMPTS:
    ids = tok.encode(prompt)
    assert len(ids) == len(prompt.encode("utf-8"))
    assert all(tok.offset <= i < tok.vocab_size for i in ids)
    assert tok.pad_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == prompt
  # Special ids are dropped; a cut multi-byte character shows as U+FFFD.
  ids = tok.encode("é")
  assert tok.decode([tok.pad_id, *ids, tok.eos_id]) == "é"
  assert tok.decode(ids[:1]) == "\ufffd"


def _save_tiny_bpe(path):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["a ginger tabby cat", "a cup of coffee"] * 20,
                          trainer)
  tok.save(str(path))
  return tok


def test_hf_tokenizer_from_tokenizer_json(tmp_path):
  path = tmp_path / "tokenizer.json"
  trained = _save_tiny_bpe(path)
  tok = text.load_text_tokenizer(str(path))
  assert isinstance(tok, text.HFTokenizer)
  assert tok.vocab_size == trained.get_vocab_size()
  assert tok.pad_id == tok.eos_id == trained.token_to_id("<|endoftext|>")
  for prompt in PROMPTS:
    assert tok.decode(tok.encode(prompt)) == prompt
  # Merges learnt from the corpus make its words shorter than their bytes.
  assert len(tok.encode("a ginger tabby cat")) < len("a ginger tabby cat")
  # A checkpoint directory holding tokenizer.json works too.
  assert text.load_text_tokenizer(str(tmp_path)).encode("cat") == tok.encode(
      "cat")


def test_missing_or_bad_tokenizer_file(tmp_path):
  missing = str(tmp_path / "nope" / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match="nope/tokenizer.json"):
    text.load_text_tokenizer(missing)
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="not a valid HF tokenizer.json"):
    text.load_text_tokenizer(str(bad))
  with pytest.raises(ValueError, match="'bytes'"):
    text.load_text_tokenizer("")


def test_batch_encode_left_pads_with_a_mask():
  tok = text.ByteTokenizer()
  ids, mask = text.batch_encode(tok, ["cat", "a cup", ""], 8, truncate=False)
  assert ids.shape == mask.shape == (3, 8)
  assert ids.dtype == mask.dtype == np.int32
  np.testing.assert_array_equal(mask.sum(1), [3, 5, 0])
  # Left padding: the real tokens end every row.
  np.testing.assert_array_equal(mask[0], [0, 0, 0, 0, 0, 1, 1, 1])
  assert np.all(ids[mask == 0] == tok.pad_id)
  for row, m, prompt in zip(ids, mask, ["cat", "a cup", ""], strict=True):
    assert text.decode_padded(tok, row, m) == prompt


def test_long_prompt_errors_for_sampling_and_truncates_for_training():
  tok = text.ByteTokenizer()
  prompt = "a ginger tabby cat"
  with pytest.raises(ValueError, match="is 18 tokens, more than the maximum"
                     " text length 8"):
    text.batch_encode(tok, [prompt], 8, truncate=False)
  ids, mask = text.batch_encode(tok, [prompt], 8, truncate=True)
  assert mask.sum() == 8
  assert text.decode_padded(tok, ids[0], mask[0]) == prompt[:8]
  with pytest.raises(TypeError, match="single str"):
    text.batch_encode(tok, prompt, 8, truncate=True)
  with pytest.raises(ValueError, match="positive, got 0"):
    text.batch_encode(tok, [prompt], 0, truncate=True)
