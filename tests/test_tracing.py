"""Causal tracing (ROME §2): a planted fact is found where it was planted."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keditjax import errors
from keditjax.analysis import tracing
from keditjax.models import lm, load, registry, sites
from keditjax.models.config import ModelConfig
from keditjax.models.lm import LanguageModel
from keditjax.models.tokenizer import Tokenizer
from tests.conftest import golden_dir

WORDS = ("pad", "the", "al", "bo", "is", "in", "yes", "no")
PLANTED_LAYER = 1


def _word_tokenizer(words):
  from tokenizers import Tokenizer as Backend, models, pre_tokenizers
  backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)},
                                     unk_token=words[0]))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return Tokenizer(backend)


def _planted_model(num_layers=4, layer=PLANTED_LAYER):
  """A Llama that knows "the al bo is in" -> "yes" through one MLP site.

  Token i embeds as the basis vector e_i. Only block `layer`'s MLP writes
  anything: its gate fires (above a bias threshold) on the clean token "bo"
  (e_3) and writes a large fact feature e_8 there. Only block `layer + 1`'s
  attention moves anything: the last token averages e_8 over the prompt (zero
  queries: uniform attention) into e_9, and the head reads e_9 as "yes"
  against a default "no" read from the last token "in". Noise on "al bo"
  pushes the gate below its threshold, so the fact lives at exactly one
  place: the last subject token's MLP output at `layer`.
  """
  config = ModelConfig(arch="llama", vocab_size=len(WORDS), hidden_size=16,
                       num_layers=num_layers, num_heads=1, num_kv_heads=1,
                       head_dim=16, intermediate_size=4,
                       max_position_embeddings=32, mlp_bias=True)
  module = registry.get_arch("llama").module(config)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jnp.zeros((1, 4), jnp.int32))["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: np.ones(x.shape, np.float32)
      if "scale" in jax.tree_util.keystr(path)
      else np.zeros(x.shape, np.float32), shapes)
  params["embed_tokens"]["embedding"][:, :len(WORDS)] = np.eye(len(WORDS))
  mlp = params[f"layers_{layer}"]["mlp"]
  mlp["gate_proj"]["kernel"][3, 0] = 2.5  # clean "bo": RMSNorm gives 4 e_3
  mlp["gate_proj"]["bias"][0] = -7.0
  mlp["up_proj"]["kernel"][3, 0] = 1.0
  mlp["down_proj"]["kernel"][0, 8] = 2.0
  attn = params[f"layers_{layer + 1}"]["self_attn"]
  attn["v_proj"]["kernel"][8, 0] = 1.0
  attn["o_proj"]["kernel"][0, 9] = 1.0
  params["lm_head"]["kernel"][9, WORDS.index("yes")] = 3.0
  params["lm_head"]["kernel"][5, WORDS.index("no")] = 1.5
  return LanguageModel(config, params, _word_tokenizer(WORDS))


@pytest.fixture(scope="module")
def planted():
  return _planted_model()


@pytest.fixture(scope="module", params=[PLANTED_LAYER, 2])
def planted_trace(request):
  """(trace, planted layer): the fact planted at two different layers."""
  model = _planted_model(layer=request.param)
  noise = 3 * tracing.embedding_std(model, ["al bo"])
  trace = tracing.causal_trace(model, "the al bo is in", "al bo", noise=noise,
                               samples=8, window=1)
  return trace, request.param


def test_trace_recovers_the_planted_mlp_site(planted_trace):
  trace, layer = planted_trace
  assert trace.tokens == ("the", "al", "bo", "is", "in")
  assert trace.subject_range == (1, 3)
  assert trace.answer == "yes"
  assert trace.high_score > 0.9 and trace.low_score < 0.2
  effect = trace.indirect_effect("mlp")
  assert effect.shape == (5, 4)
  peak = np.unravel_index(np.argmax(effect), effect.shape)
  assert peak == (2, layer)  # last subject token, planted layer
  assert effect[peak] > 0.5
  elsewhere = np.delete(effect.ravel(), np.ravel_multi_index(peak, effect.shape))
  assert np.abs(elsewhere).max() < 0.1 * effect[peak]
  # The attention that moves the fact: last token, the block after.
  attn = trace.indirect_effect("attn")
  assert np.unravel_index(np.argmax(attn), attn.shape) == (4, layer + 1)


def test_resid_trace_semantics(planted_trace):
  trace, layer = planted_trace
  scores = trace.scores["resid"]
  # The whole residual stream at the last token, last layer: the clean run.
  np.testing.assert_allclose(scores[4, -1], trace.high_score, atol=1e-6)
  # Before the subject the runs agree, so restoring is a no-op.
  np.testing.assert_allclose(scores[0], trace.low_score, atol=1e-6)
  # The subject's last token carries the fact up to the MLP that reads it;
  # once the attention above has read it, restoring it there is too late.
  assert scores[2, :layer + 1].min() > 0.5
  assert scores[2, layer + 1:].max() < trace.low_score + 0.05


def _reference_score(model, trace, clean, kind, token, centre):
  """ROME's `trace_with_patch`, unbatched: one forward pass per restoration."""
  config, ids = model.config, np.array(trace.token_ids)
  first, stop = trace.subject_range
  noise = np.zeros((trace.samples, len(ids), config.hidden_size), np.float32)
  noise[:, first:stop] = tracing.corruption_noise(
      1, trace.samples, stop - first, config.hidden_size, trace.noise)
  half = 0 if kind == "resid" else trace.window // 2
  stop_layer = centre + 1 if kind == "resid" else min(
      config.num_layers, centre + trace.window - trace.window // 2)
  patches = {"embed": sites.Patch(noise)}
  for layer in range(max(0, centre - half), stop_layer):
    name = f"layer/{layer}/{tracing.KINDS[kind]}"
    patches[name] = sites.Patch(clean[name][:, token:token + 1],
                                np.array([token]), mode="replace")
  logits, _ = lm.forward(config, model.params,
                         np.tile(ids, (trace.samples, 1)),
                         sites=sites.Sites(patches=patches))
  return float(jax.nn.softmax(logits[:, -1])[:, trace.answer_id].mean())


@pytest.mark.parametrize("name, prompt, checks", [
    # Six tokens: restored spans fall in two length buckets.
    ("llama_gqa_tied", "w5 w17 w99 w3 w42 w8", [(1, 0), (2, 1), (4, 0), (5, 1)]),
    ("gpt2", "w5 w17 w99 w3", [(1, 1), (2, 0), (3, 1)])])
def test_batched_trace_equals_one_pass_per_restoration(name, prompt, checks):
  golden = load("hf:" + golden_dir(name))
  vocab = [f"w{i}" for i in range(golden.config.vocab_size)]
  model = LanguageModel(golden.config, golden.params, _word_tokenizer(vocab))
  trace = tracing.causal_trace(model, prompt, "w17 w99", noise=0.5, samples=3,
                               window=3, chunk_size=32)
  assert trace.subject_range == (1, 3)
  _, clean = lm.forward(model.config, model.params,
                        np.array(trace.token_ids)[None],
                        sites=sites.capture(*model.site_names()))
  for kind in tracing.KINDS:
    for token, centre in checks:
      np.testing.assert_allclose(
          trace.scores[kind][token, centre],
          _reference_score(model, trace, clean, kind, token, centre), atol=2e-6,
          err_msg=f"{name} {kind} token {token} centre {centre}")


def test_noise_is_reproducible_from_the_seed(planted):
  run = lambda seed: tracing.causal_trace(
      planted, "the al bo is in", "al bo", noise=0.7, samples=2, window=1,
      kinds=("mlp",), seed=seed)
  a, b, c = run(3), run(3), run(4)
  np.testing.assert_array_equal(a.scores["mlp"], b.scores["mlp"])
  assert a.low_score == b.low_score != c.low_score
  assert tuple(a.scores) == ("mlp",)


def test_a_new_prompt_in_the_same_buckets_does_not_recompile(planted):
  compiles = []
  listener = lambda event, secs, **_: compiles.append(event) if (
      event == "/jax/core/compile/backend_compile_duration") else None
  run = lambda prompt, subject: tracing.causal_trace(
      planted, prompt, subject, noise=0.7, samples=2, window=2)
  run("the al bo is in", "al bo")
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    trace = run("the bo al in is", "bo al")
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles
  assert trace.subject_range == (1, 3)


def test_bad_inputs_are_refused_before_work(planted):
  trace = lambda prompt="the al bo is in", subject="al bo", **kw: (
      tracing.causal_trace(planted, prompt, subject, **{"noise": 0.5, **kw}))
  with pytest.raises(errors.InputError, match="does not occur"):
    trace(subject="yes")
  with pytest.raises(errors.InputError, match="does not occur"):
    trace(subject="")
  with pytest.raises(errors.InputError, match="non-empty"):
    trace(prompt="")
  with pytest.raises(errors.InputError, match="kinds"):
    trace(kinds=("mlp", "ffn"))
  with pytest.raises(errors.InputError, match="samples"):
    trace(samples=0)
  with pytest.raises(errors.InputError, match="noise"):
    trace(noise=float("nan"))
  with pytest.raises(errors.InputError):
    tracing.average_traces([])


def test_subject_range_on_subword_tokens():
  from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers
  from tokenizers import trainers
  backend = Backend(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.train_from_iterator(
      ["Vinson Massif is located in the continent of Antarctica"] * 3,
      trainers.BpeTrainer(vocab_size=280, show_progress=False,
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tokenizer = Tokenizer(backend)
  ids = tokenizer.encode("Vinson Massif is located in the continent of")
  assert len(ids) > 8  # subword pieces, so ranges are not word counts
  for subject in ["Vinson Massif", "Massif", "continent", "ent of"]:
    start, stop = tracing.subject_range(tokenizer, ids, subject)
    assert subject in tokenizer.decode(ids[start:stop])  # covers it,
    assert subject not in tokenizer.decode(ids[start + 1:stop])  # minimally
    assert subject not in tokenizer.decode(ids[start:stop - 1])
  assert tracing.subject_range(tokenizer, ids, "Vinson Massif") == (0, 6)


def _fake_trace(num_tokens, subject_range, value_per_token):
  scores = np.repeat(np.asarray(value_per_token, np.float32)[:, None], 2, 1)
  return tracing.Trace(
      prompt="", subject="", token_ids=tuple(range(num_tokens)),
      tokens=("t",) * num_tokens, subject_range=subject_range, answer_id=0,
      answer="", high_score=1.0, low_score=0.0, scores={"mlp": scores},
      noise=1.0, samples=1, window=1)


def test_average_pools_rome_token_groups():
  # 6 tokens, subject [1, 4): first 1, middle 2, last 3, next 4, last 5.
  a = _fake_trace(6, (1, 4), [9, 1, 2, 3, 4, 5])
  # One-token subject right before the last token: it is first and last
  # subject token, and the last token is also the first subsequent one.
  b = _fake_trace(3, (1, 2), [9, 10, 20])
  avg = tracing.average_traces([a, b])
  np.testing.assert_array_equal(avg["count"], [2, 1, 2, 2, 0, 2])
  effect = avg["mlp"]["effect"][:, 0]
  np.testing.assert_allclose(effect[[0, 1, 2, 3, 5]], [5.5, 2, 6.5, 12, 12.5])
  assert np.isnan(effect[4])
  assert json.loads(json.dumps(tracing.to_json(avg), allow_nan=False))[
      "mlp"]["effect"][4] == [None, None]


def test_launcher_writes_heatmaps_and_json(planted, tmp_path, monkeypatch):
  from absl import flags
  from absl.testing import flagsaver
  from experiments import trace as launcher
  flags.FLAGS.mark_as_parsed()
  # Keep the process-wide JAX config (persistent cache) as the suite set it.
  monkeypatch.setattr(launcher.common, "setup", lambda: None)
  from keditjax import models
  model_dir = models.save(planted, str(tmp_path / "model"))
  data = tmp_path / "known.json"
  data.write_text(json.dumps([
      {"known_id": 7, "subject": "al bo", "attribute": "yes",
       "prompt": "the al bo is in"},
      {"known_id": 8, "subject": "al", "attribute": "no",
       "prompt": "the al bo is in"}]))
  out = tmp_path / "out"
  with flagsaver.flagsaver(model="hf:" + model_dir, data_path=str(data),
                           output_dir=str(out), num_prompts=2, samples=2,
                           window=1):
    launcher.main([])
  result = json.loads((out / "trace.json").read_text())
  assert [p["known_id"] for p in result["prompts"]] == [7, 8]
  assert result["prompts"][0]["correct"] and not result["prompts"][1]["correct"]
  assert len(result["average"]["mlp"]["effect"]) == len(tracing.GROUPS)
  assert sorted(os.listdir(out)) == ["average.png", "trace.json",
                                     "trace_7.png", "trace_8.png"]
  # As in ROME, --only_correct skips facts the model gets wrong.
  data.write_text(json.dumps([{"known_id": 8, "subject": "al", "attribute": "no",
                               "prompt": "the al bo is in"}] * 3 + [
      {"known_id": 7, "subject": "al bo", "attribute": "yes",
       "prompt": "the al bo is in"}]))
  with flagsaver.flagsaver(model="hf:" + model_dir, data_path=str(data),
                           output_dir=str(out / "correct"), num_prompts=1,
                           samples=2, window=1, only_correct=True, noise=0.5,
                           kinds=["mlp"]):
    launcher.main([])
  result = json.loads((out / "correct" / "trace.json").read_text())
  assert [p["known_id"] for p in result["prompts"]] == [7]
  assert result["noise"] == 0.5
  assert list(result["peak_layers"]) == ["mlp"]
  assert result["peak_layers"]["mlp"]["last subject token"][0] == PLANTED_LAYER
