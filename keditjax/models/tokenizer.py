"""A thin tokenizer over `tokenizers.Tokenizer` (no torch, no special tokens).

`encode(text)` adds no special tokens unless asked: factual prompts are scored
and edited as plain text, as ROME and MEMIT do. Build one from a
`tokenizer.json`, a Hugging Face directory, or a GGUF vocabulary.
"""

from __future__ import annotations

import json
import os

from keditjax import errors


class Tokenizer:
  """Text <-> ids.

  Attributes:
    backend: the `tokenizers.Tokenizer`.
    bos_id, eos_id, pad_id: special ids (None when the model has none).
  """

  def __init__(self, backend, *, bos_id=None, eos_id=None, pad_id=None):
    # Some tokenizer.json files pad/truncate every input to a fixed length
    # (all-MiniLM-L6-v2 pads to 128); keditjax pads to its own length buckets.
    backend.no_padding()
    backend.no_truncation()
    self.backend = backend
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text` (no special tokens by default)."""
    if not isinstance(text, str):
      raise errors.InputError(f"encode expects a str, got {type(text).__name__}.")
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts, *, add_special_tokens: bool = False):
    return [e.ids for e in self.backend.encode_batch(
        list(texts), add_special_tokens=add_special_tokens)]

  def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
    """The text of `ids`."""
    return self.backend.decode([int(i) for i in ids],
                               skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str):
    return self.backend.token_to_id(token)

  def save(self, directory: str) -> None:
    """Writes `tokenizer.json` and `tokenizer_config.json` (transformers-loadable)."""
    os.makedirs(directory, exist_ok=True)
    self.backend.save(os.path.join(directory, "tokenizer.json"))
    def token(i):
      return None if i is None else self.backend.id_to_token(i)
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "clean_up_tokenization_spaces": False,
              "bos_token": token(self.bos_id), "eos_token": token(self.eos_id),
              "pad_token": token(self.pad_id), "add_bos_token": False}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump({k: v for k, v in config.items() if v is not None}, f, indent=2)

  @classmethod
  def from_file(cls, path: str, **ids) -> "Tokenizer":
    """Loads a `tokenizer.json` file."""
    from tokenizers import Tokenizer as Backend
    return cls._build(Backend.from_file, path, path, **ids)

  @classmethod
  def from_json(cls, text: str, **ids) -> "Tokenizer":
    """Builds a tokenizer from a serialized `tokenizers` JSON string."""
    from tokenizers import Tokenizer as Backend
    return cls._build(Backend.from_str, text, "tokenizer JSON", **ids)

  @classmethod
  def _build(cls, make, source, what, **ids) -> "Tokenizer":
    try:
      backend = make(source)
    except Exception as e:  # tokenizers raises plain Exceptions.
      raise errors.TokenizerError(f"{what}: cannot load tokenizer ({e}).") from None
    return cls(backend, **ids)

  @classmethod
  def from_directory(cls, directory: str, *, bos_id=None, eos_id=None,
                     pad_id=None) -> "Tokenizer | None":
    """The tokenizer of a Hugging Face directory, or None if it has none."""
    path = os.path.join(directory, "tokenizer.json")
    ids = dict(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    if os.path.exists(path):
      return cls.from_file(path, **ids)
    if any(os.path.exists(os.path.join(directory, f))
           for f in ("vocab.json", "vocab.txt", "tokenizer.model")):
      try:  # slow-tokenizer files: let transformers convert them.
        from transformers import AutoTokenizer
        fast = AutoTokenizer.from_pretrained(directory)
        return cls(fast.backend_tokenizer, **ids)
      except Exception as e:
        raise errors.TokenizerError(f"{directory}: cannot load tokenizer ({e}).") from None
    return None
