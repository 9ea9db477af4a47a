"""End-to-end checks on the real default model (SmolLM2-135M, bundled GGUF).

The references in `golden/smollm2` come from transformers' PyTorch Llama
loaded from the same GGUF (`golden/make_golden.py`).
"""

import json
import os

import numpy as np
import pytest

from conftest import GOLDEN
from keditjax.models import load, save
from keditjax.models.hf import flatten

REF = os.path.join(GOLDEN, "smollm2")


def test_config(smollm2):
  c = smollm2.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (30, 576, 9, 3)
  assert c.rope_theta == 100000.0 and c.tie_word_embeddings


def test_logits_match_transformers(smollm2):
  ref = np.load(os.path.join(REF, "logits.npz"))
  m = smollm2
  logits = np.asarray(m.apply(m.params, ref["ids_0"][None]))[0]
  assert np.abs(logits - ref["logits_0"]).max() <= 1e-3
  for i in range(1, 4):
    last = np.asarray(m.apply(m.params, ref[f"ids_{i}"][None]))[0, -1]
    assert np.abs(last - ref[f"last_logits_{i}"]).max() <= 1e-3


def test_tokenizer_matches_transformers(smollm2):
  with open(os.path.join(REF, "tokens.json")) as f:
    cases = json.load(f)
  assert len(cases) >= 10
  for case in cases:
    assert smollm2.tokenizer.encode(case["text"]) == case["ids"], case["text"]
    assert smollm2.tokenizer.decode(case["ids"]) == case["text"]


def test_greedy_paris(smollm2):
  with open(os.path.join(REF, "info.json")) as f:
    greedy = json.load(f)["greedy"]
  m = smollm2
  text = m.generate(m.params, "The capital of France is", 8)
  assert text.startswith(" Paris")
  ids = m.generate(m.params, "The capital of France is", 8, return_ids=True,
                   stop_at_eos=False)
  assert ids == greedy["new_ids"]


def test_score_prefers_true_facts(smollm2):
  m = smollm2
  lp = m.score(m.params, ["The capital of France is"] * 2, [" Paris", " London"])
  assert lp[0] > lp[1]


def test_export_round_trip(smollm2, tmp_path):
  out = str(tmp_path / "smollm2-hf")
  save(smollm2, out)
  again = load(f"hf:{out}")
  assert again.config == smollm2.config.replace(hf_model_type="llama")
  a, b = flatten(smollm2.params), flatten(again.params)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert again.tokenizer.encode("The capital of France is") == \
      smollm2.tokenizer.encode("The capital of France is")
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM, AutoTokenizer
  ref = AutoModelForCausalLM.from_pretrained(out).eval()
  tok = AutoTokenizer.from_pretrained(out)
  ids = tok("The mother tongue of Danielle Darrieux is",
            add_special_tokens=False)["input_ids"]
  assert ids == smollm2.tokenizer.encode("The mother tongue of Danielle Darrieux is")
  with torch.no_grad():
    want = ref(input_ids=torch.tensor([ids])).logits.numpy()
  got = np.asarray(smollm2.apply(smollm2.params, np.array([ids])))
  assert np.abs(got - want).max() <= 1e-3
