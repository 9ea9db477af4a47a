"""Export to a Hugging Face directory, sharded checkpoints, and reloading."""

import json

import jax
import numpy as np
import pytest

from conftest import golden_arrays, golden_dir
from keditjax import errors
from keditjax.models import load, save
from keditjax.models.hf import flatten

NAMES = ["llama_gqa_tied", "qwen2_bias_untied", "llama3_rope_scaling",
         "mistral_gqa"]


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trip(name, tmp_path):
  model = load("hf:" + golden_dir(name))
  save(model, str(tmp_path / "out"))
  again = load(f"hf:{tmp_path / 'out'}")
  assert again.config == model.config
  a, b = flatten(model.params), flatten(again.params)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_export_refuses_to_overwrite_and_nonfinite(tiny_llama, tmp_path):
  save(tiny_llama, str(tmp_path))
  with pytest.raises(errors.CheckpointError, match="already holds"):
    save(tiny_llama, str(tmp_path))
  bad = jax.tree.map(lambda x: x * np.nan, tiny_llama.params)
  with pytest.raises(errors.CheckpointError, match="non-finite"):
    save(tiny_llama, str(tmp_path / "nan"), params=bad)


def test_sharded_index_checkpoint(tmp_path):
  from safetensors.numpy import load_file, save_file
  src = golden_dir("qwen2_bias_untied")
  tensors = load_file(f"{src}/model.safetensors")
  names = sorted(tensors)
  half = len(names) // 2
  shards = {"model-00001-of-00002.safetensors": names[:half],
            "model-00002-of-00002.safetensors": names[half:]}
  weight_map = {}
  for fname, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, tmp_path / fname)
    weight_map.update({k: fname for k in keys})
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))
  (tmp_path / "config.json").write_text(open(f"{src}/config.json").read())
  model = load(f"hf:{tmp_path}")
  g = golden_arrays("qwen2_bias_untied")
  logits = np.asarray(model.apply(model.params, g["input_ids"],
                                  attention_mask=g["attention_mask"]))
  valid = g["attention_mask"].astype(bool)
  assert np.abs(logits - g["logits"])[valid].max() < 1e-4
  (tmp_path / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(errors.CheckpointError, match="missing"):
    load(f"hf:{tmp_path}")


@pytest.mark.parametrize("name", ["llama_gqa_tied", "qwen2_bias_untied"])
def test_exported_model_loads_in_transformers(name, tmp_path):
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM
  model = load("hf:" + golden_dir(name))
  save(model, str(tmp_path))
  ref = AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                             attn_implementation="eager").eval()
  g = golden_arrays(name)
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(g["input_ids"]).long()).logits.numpy()
  got = np.asarray(model.apply(model.params, g["input_ids"]))
  assert np.abs(got - want).max() < 1e-4
