"""Bad input raises a keditjax error naming the problem, before any work."""

import json
import os
import shutil

import pytest

from conftest import golden_dir
from keditjax import errors
from keditjax.models import from_hf_config, load


def _copy(name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(golden_dir(name), dst)
  return dst


def _edit_config(directory, **changes):
  path = directory / "config.json"
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


def test_unknown_model_name():
  with pytest.raises(errors.ModelNotFoundError, match="Unknown model 'gpt-5'"):
    load("gpt-5")


def test_directory_without_config(tmp_path):
  with pytest.raises(errors.ModelNotFoundError, match="no config.json"):
    load(f"hf:{tmp_path}")


def test_missing_directory(tmp_path):
  with pytest.raises(errors.ModelNotFoundError, match="not a model directory"):
    load(f"hf:{tmp_path}/nope")


def test_unknown_rope_scaling_type(tmp_path):
  d = _copy("llama_gqa_tied", tmp_path)
  _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                   "rope_theta": 10000.0})
  with pytest.raises(errors.UnsupportedConfigError, match="rope_type.*yarn"):
    load(f"hf:{d}")


def test_unknown_config_field(tmp_path):
  d = _copy("llama_gqa_tied", tmp_path)
  _edit_config(d, attn_logit_softcapping=50.0)
  with pytest.raises(errors.UnsupportedConfigError, match="attn_logit_softcapping"):
    load(f"hf:{d}")
  assert load(f"hf:{d}", strict=False).config.num_layers == 2


def test_unsupported_activation_and_architecture():
  base = json.load(open(os.path.join(golden_dir("llama_gqa_tied"), "config.json")))
  with pytest.raises(errors.UnsupportedConfigError, match="hidden_act"):
    from_hf_config({**base, "hidden_act": "swish_cubed"})
  with pytest.raises(errors.UnsupportedArchitectureError, match="falcon"):
    from_hf_config({**base, "model_type": "falcon"})


def test_truncated_safetensors(tmp_path):
  d = _copy("llama_gqa_tied", tmp_path)
  weights = d / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[: len(data) // 2])
  with pytest.raises(errors.CheckpointError, match="model.safetensors"):
    load(f"hf:{d}")


def test_unmapped_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file
  d = _copy("llama_gqa_tied", tmp_path)
  tensors = load_file(d / "model.safetensors")
  tensors["model.layers.0.mystery.weight"] = tensors["model.norm.weight"]
  save_file(tensors, d / "model.safetensors")
  with pytest.raises(errors.CheckpointError, match="mystery"):
    load(f"hf:{d}")


def test_missing_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file
  d = _copy("llama_gqa_tied", tmp_path)
  tensors = load_file(d / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, d / "model.safetensors")
  with pytest.raises(errors.CheckpointError, match="layers_1/mlp/up_proj"):
    load(f"hf:{d}")


def test_errors_are_one_family():
  for cls in (errors.ConfigError, errors.CheckpointError, errors.SiteError,
              errors.ModelNotFoundError, errors.InputError):
    assert issubclass(cls, errors.KeditError)


def test_nonfinite_tensor(tmp_path):
  import numpy as np
  from safetensors.numpy import load_file, save_file
  d = _copy("llama_gqa_tied", tmp_path)
  tensors = load_file(d / "model.safetensors")
  tensors["model.norm.weight"] = tensors["model.norm.weight"] * np.nan
  save_file(tensors, d / "model.safetensors")
  with pytest.raises(errors.CheckpointError, match="model.norm.weight.*NaN"):
    load(f"hf:{d}")


def test_hub_ids_are_downloaded_with_huggingface_hub(monkeypatch):
  import huggingface_hub
  calls = []

  def fake_download(repo_id, allow_patterns):
    calls.append((repo_id, allow_patterns))
    return golden_dir("llama_gqa_tied")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
  model = load("hf:someone/tiny-llama")
  assert calls[0][0] == "someone/tiny-llama"
  assert "config.json" in calls[0][1] and "*.safetensors" in calls[0][1]
  assert model.config.num_kv_heads == 2


def test_hub_download_failure_is_a_keditjax_error(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(errors.ModelNotFoundError, match="Could not download"):
    load("hf:someone/does-not-exist-anywhere")


def test_v4_style_rope_config_parses_like_v5():
  v5 = json.load(open(os.path.join(golden_dir("llama3_rope_scaling"), "config.json")))
  rope = v5["rope_parameters"]
  scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
  v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
  v4.update(rope_theta=rope["rope_theta"],
            rope_scaling={**scaling, "type": "llama3"})  # the old key name
  assert from_hf_config(v4) == from_hf_config(v5)
  assert from_hf_config(v4).rope_scaling_dict["rope_type"] == "llama3"
