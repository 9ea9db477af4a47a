"""Llama-family parity with Hugging Face PyTorch (stored golden logits)."""

import numpy as np
import pytest

from conftest import golden_arrays, golden_dir
from keditjax.models import load

LLAMA_FAMILY = ["llama_gqa_tied", "llama3_rope_scaling", "qwen2_bias_untied",
                "mistral_gqa"]


@pytest.mark.parametrize("name", LLAMA_FAMILY)
def test_golden_logits(name):
  model = load("hf:" + golden_dir(name))
  g = golden_arrays(name)
  logits = np.asarray(model.apply(model.params, g["input_ids"],
                                  attention_mask=g["attention_mask"]))
  valid = g["attention_mask"].astype(bool)
  np.testing.assert_array_less(np.abs(logits - g["logits"])[valid], 1e-4)


def test_variants_parse_their_features():
  tied = load("hf:" + golden_dir("llama_gqa_tied")).config
  assert tied.tie_word_embeddings and tied.num_kv_heads == 2
  qwen = load("hf:" + golden_dir("qwen2_bias_untied")).config
  assert qwen.attention_bias and not qwen.attention_out_bias
  assert not qwen.tie_word_embeddings
  scaled = load("hf:" + golden_dir("llama3_rope_scaling")).config
  assert scaled.rope_scaling_dict["rope_type"] == "llama3"
  assert load("hf:" + golden_dir("mistral_gqa")).config.sliding_window == 4


def test_rope_scaling_changes_logits():
  """The llama3 scaling is not a no-op at this size (else the test is vacuous)."""
  model = load("hf:" + golden_dir("llama3_rope_scaling"))
  g = golden_arrays("llama3_rope_scaling")
  plain = model.config.replace(rope_scaling=None)
  from keditjax.models.lm import forward
  a, _ = forward(model.config, model.params, g["input_ids"])
  b, _ = forward(plain, model.params, g["input_ids"])
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_sliding_window_matters():
  model = load("hf:" + golden_dir("mistral_gqa"))
  g = golden_arrays("mistral_gqa")
  from keditjax.models.lm import forward
  a, _ = forward(model.config, model.params, g["input_ids"])
  b, _ = forward(model.config.replace(sliding_window=None), model.params,
                 g["input_ids"])
  assert np.abs(np.asarray(a) - np.asarray(b))[:, 5:].max() > 1e-3
