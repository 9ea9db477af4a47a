"""Shared fixtures: tiny golden checkpoints and the real default model."""

import os

import numpy as np
import pytest

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def golden_dir(name: str) -> str:
  return os.path.join(GOLDEN, name)


def golden_arrays(name: str) -> dict:
  return dict(np.load(os.path.join(GOLDEN, name, "golden.npz")))


@pytest.fixture(scope="session")
def tiny_llama():
  from keditjax.models import load
  return load("hf:" + golden_dir("llama_gqa_tied"))


@pytest.fixture(scope="session")
def smollm2():
  """The real default model (SmolLM2-135M from the bundled GGUF)."""
  from keditjax.models import load
  try:
    return load("smollm2-135m")
  except Exception as e:  # pragma: no cover - the package is a test dependency.
    pytest.fail(f"default model unavailable: {e}")


def byte_tokenizer():
  """A byte-level tokenizer (256 byte tokens + BOS/EOS), no merges."""
  from tokenizers import Tokenizer as HFTokenizer, decoders, models
  from tokenizers import pre_tokenizers
  from keditjax.models.tokenizer import Tokenizer
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(alphabet)}
  vocab["<s>"], vocab["</s>"] = 256, 257
  hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  return Tokenizer.from_json(hf.to_str(), bos_id=256, eos_id=257)


def make_tiny_lm(num_layers=4, seed=0, arch="llama"):
  """A random tiny decoder with a byte tokenizer (for editor tests)."""
  import jax
  import jax.numpy as jnp
  from keditjax.models import registry
  from keditjax.models.config import ModelConfig
  from keditjax.models.lm import LanguageModel
  config = ModelConfig(arch=arch, vocab_size=258, hidden_size=64,
                       num_layers=num_layers, num_heads=4, num_kv_heads=2,
                       head_dim=16, intermediate_size=128,
                       max_position_embeddings=256, norm_eps=1e-5,
                       activation="silu" if arch == "llama" else "gelu_new",
                       rope_theta=10000.0, tie_word_embeddings=True,
                       hf_model_type=arch, bos_token_id=256, eos_token_id=257)
  module = registry.get_arch(arch).module(config)
  params = module.init(jax.random.key(seed),
                       jnp.zeros((1, 8), jnp.int32))["params"]
  return LanguageModel(config, params, byte_tokenizer(), name="tiny")


@pytest.fixture(scope="session")
def tiny_lm():
  return make_tiny_lm()
