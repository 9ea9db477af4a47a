"""Adapters in params: every forward path honours them, removal is exact.

The acceptance check of "edits as objects": one random adapter at
`layer/3/mlp/value` (reading `layer/3/mlp/key`) changes the logits the same
way through `forward`, scoring, `run_scanned`, KV-cached greedy generation
(equal to a loop without a cache) and a sharded apply on 8 simulated devices;
removing it restores the original logits bit for bit.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keditjax import errors, models
from keditjax.evaluation import scoring
from keditjax.models import adapters, lm, sites as sites_lib
from tests.conftest import make_tiny_lm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = "layer/3/mlp/value"


def low_rank_from_key(params, x_BxLxD, inputs, *, scale=1.0):
  """A test adapter: x + scale · tanh(k A) B with k the block's MLP key."""
  k_BxLxF = inputs["mlp/key"]
  return x_BxLxD + scale * jnp.tanh(k_BxLxF @ params["a"]) @ params["b"]


def scale_output(params, x_BxLxD, inputs, *, factor=1.0):
  """A test adapter that does not commute with an additive one."""
  del inputs
  return factor * params["gain"] * x_BxLxD


def random_adapter(model, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  f, d = model.config.intermediate_size, model.config.hidden_size
  return adapters.Adapter(
      {"a": jnp.asarray(rng.normal(size=(f, 4)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(4, d)) * 0.5, jnp.float32)},
      low_rank_from_key, inputs=("mlp/key",), options=(("scale", scale),),
      kind="test")


@pytest.fixture(scope="module")
def model():
  return make_tiny_lm()


@pytest.fixture(scope="module")
def edited(model):
  return adapters.with_adapters(model.params, SITE, (random_adapter(model),))


def _tokens(model, texts):
  ids = [model.encode(t) for t in texts]
  length = max(map(len, ids))
  tokens = np.zeros((len(ids), length), np.int32)
  mask = np.zeros((len(ids), length), np.int32)
  for row, i in enumerate(ids):
    tokens[row, :len(i)] = i
    mask[row, :len(i)] = 1
  return tokens, mask


TEXTS = ["The capital of Norway is", "Toko Yasuda plays the piano"]


def test_adapter_changes_forward_and_params_stay_untouched(model, edited):
  tokens, mask = _tokens(model, TEXTS)
  plain = np.asarray(model.apply(model.params, tokens, attention_mask=mask))
  with_adapter = np.asarray(model.apply(edited, tokens, attention_mask=mask))
  assert np.abs(with_adapter - plain).max() > 1e-2
  assert "adapters" not in model.params  # with_adapters copies
  # Blocks before the adapter's layer are untouched: the residual entering
  # block 3 is the same.
  names = ("layer/2/resid",)
  _, a = model.apply(model.params, tokens, attention_mask=mask,
                     sites=sites_lib.capture(*names))
  _, b = model.apply(edited, tokens, attention_mask=mask,
                     sites=sites_lib.capture(*names))
  np.testing.assert_array_equal(a[names[0]], b[names[0]])


def test_adapter_equals_the_same_change_as_a_patch(model, edited):
  """The adapter's output written by hand as a replace patch gives the same
  logits: the adapter sees the block's real mlp/key."""
  tokens, mask = _tokens(model, TEXTS)
  _, out = model.apply(model.params, tokens, attention_mask=mask,
                       sites=sites_lib.capture("layer/3/mlp/key",
                                               "layer/3/mlp/value"))
  adapter = random_adapter(model)
  new_value = adapter(out["layer/3/mlp/value"],
                      {"mlp/key": out["layer/3/mlp/key"]})
  by_patch = model.apply(model.params, tokens, attention_mask=mask,
                         sites=sites_lib.patch(SITE, new_value, mode="replace"))[0]
  np.testing.assert_allclose(
      model.apply(edited, tokens, attention_mask=mask), by_patch, atol=1e-5)


def test_scoring_and_scanned_pass_see_the_adapter(model, edited):
  prompts, targets = ["The capital of Norway is", "Toko plays"], [" Rome", " a harp"]
  for params in (model.params, edited):
    scored = scoring.teacher_forced(model, params, prompts, targets)
    for p, t, s in zip(prompts, targets, scored):
      ids = model.encode(p) + model.encode(t)
      logits = np.asarray(model.apply(params, np.asarray([ids])))[0]
      logp = jax.nn.log_softmax(logits, -1)
      n = len(model.encode(p))
      want = [logp[n - 1 + i, tok] for i, tok in enumerate(model.encode(t))]
      np.testing.assert_allclose(s.logprobs, want, atol=1e-4)
  tokens, mask = _tokens(model, TEXTS)
  hidden, _, _ = lm.run(model.config, edited, jnp.asarray(tokens),
                        attention_mask=jnp.asarray(mask), stop_layer=1)
  scanned = lm.run_scanned(model.config, edited, hidden, start_layer=1,
                           attention_mask=jnp.asarray(mask))
  np.testing.assert_allclose(
      scanned, model.apply(edited, tokens, attention_mask=mask), atol=1e-5)


def test_kv_cached_generation_equals_a_loop_without_cache(model, edited):
  prompt = "The capital of Norway is"
  cached = model.generate(edited, prompt, max_new_tokens=8, return_ids=True,
                          stop_at_eos=False)
  ids = model.encode(prompt)
  for _ in range(8):
    logits = np.asarray(model.apply(edited, np.asarray([ids])))
    ids = ids + [int(np.argmax(logits[0, -1]))]
  assert cached == ids[-8:]
  plain = model.generate(model.params, prompt, max_new_tokens=8,
                         return_ids=True, stop_at_eos=False)
  assert plain != cached  # the adapter is strong enough to matter


def test_removing_the_adapter_restores_logits_bit_for_bit(model, edited):
  tokens, mask = _tokens(model, TEXTS)
  removed = adapters.with_adapters(edited, SITE, ())
  assert "adapters" not in removed
  np.testing.assert_array_equal(
      model.apply(removed, tokens, attention_mask=mask),
      model.apply(model.params, tokens, attention_mask=mask))


def test_adapters_stack_in_order(model):
  first = random_adapter(model, 0)
  second = adapters.Adapter({"gain": jnp.float32(0.5)}, scale_output,
                            options={"factor": 3.0}, kind="scale")
  tokens, mask = _tokens(model, TEXTS)
  both = adapters.with_adapters(model.params, SITE, (first, second))
  _, out = model.apply(model.params, tokens, attention_mask=mask,
                       sites=sites_lib.capture("layer/3/mlp/key",
                                               "layer/3/mlp/value"))
  inputs = {"mlp/key": out["layer/3/mlp/key"]}
  by_hand = second(first(out["layer/3/mlp/value"], inputs), inputs)
  by_patch = model.apply(model.params, tokens, attention_mask=mask,
                         sites=sites_lib.patch(SITE, by_hand, mode="replace"))[0]
  np.testing.assert_allclose(model.apply(both, tokens, attention_mask=mask),
                             by_patch, atol=1e-5)
  swapped = adapters.with_adapters(model.params, SITE, (second, first))
  assert np.abs(np.asarray(model.apply(swapped, tokens, attention_mask=mask))
                - np.asarray(by_patch)).max() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj"])
def test_mlp_in_site_is_the_mlp_input(arch):
  """`mlp/in` is what the MLP reads: its first projection applied to the
  captured `mlp/in` gives the captured `mlp/key` (through the activation)."""
  from keditjax.models import layers
  m = make_tiny_lm(arch=arch)
  tokens, mask = _tokens(m, TEXTS)
  _, out = m.apply(m.params, tokens, attention_mask=mask,
                   sites=sites_lib.capture("layer/1/mlp/in", "layer/1/mlp/key"))
  x = np.asarray(out["layer/1/mlp/in"])
  block = m.params[{"llama": "layers_1", "gpt2": "h_1", "gptj": "h_1"}[arch]]
  act = layers.activation(m.config.activation)
  if arch == "llama":
    key = act(x @ block["mlp"]["gate_proj"]["kernel"]) * (
        x @ block["mlp"]["up_proj"]["kernel"])
  else:
    fc = block["mlp"]["c_fc" if arch == "gpt2" else "fc_in"]
    key = act(x @ fc["kernel"] + fc["bias"])
  np.testing.assert_allclose(key, out["layer/1/mlp/key"], atol=1e-5)
  zero = m.apply(m.params, tokens, attention_mask=mask,
                 sites=sites_lib.patch("layer/1/mlp/in", 0.0, mode="replace"))[0]
  assert np.abs(np.asarray(zero) - np.asarray(
      m.apply(m.params, tokens, attention_mask=mask))).max() > 1e-4


def test_bad_adapters_are_refused(model):
  tokens, _ = _tokens(model, TEXTS)
  bad_site = adapters.with_adapters(model.params, "layer/9/mlp/value",
                                    (random_adapter(model),))
  with pytest.raises(errors.SiteError, match="layer 9"):
    model.apply(bad_site, tokens)
  with pytest.raises(errors.SiteError, match="layer 9"):
    model.generate(bad_site, "The", max_new_tokens=2)
  with pytest.raises(errors.SiteError, match="layer 9"):
    scoring.teacher_forced(model, bad_site, ["The"], [" cat"])
  reads_later = adapters.Adapter(
      {"a": jnp.zeros(3)}, low_rank_from_key, inputs=("mlp/value",))
  later = adapters.with_adapters(model.params, "layer/1/mlp/key",
                                 (reads_later,))
  with pytest.raises(errors.SiteError, match="before"):
    model.apply(later, tokens)
  with pytest.raises(errors.SiteError, match="Adapter"):
    adapters.with_adapters(model.params, SITE, ("not an adapter",))


def _grace_adapter(model):
  from keditjax.editors import grace
  a = grace.empty_codebook(4, model.config.intermediate_size,
                           model.config.hidden_size, "replace_last")
  rng = np.random.default_rng(0)
  p = dict(a.params)
  p["keys"] = jnp.asarray(rng.normal(size=p["keys"].shape), jnp.float32)
  p["values"] = jnp.asarray(rng.normal(size=p["values"].shape), jnp.float32)
  p["eps"] = jnp.full((4,), 1e3, jnp.float32)  # everything hits
  p["active"] = jnp.asarray([1, 0, 1, 0], jnp.int32)
  import dataclasses
  return dataclasses.replace(a, params=p)


def test_hf_export_refuses_adapters_and_keditjax_format_keeps_them(
    model, tmp_path):
  edited = adapters.with_adapters(model.params, SITE, (_grace_adapter(model),))
  with pytest.raises(errors.CheckpointError, match="grace at layer/3/mlp/value"):
    models.save(model, str(tmp_path / "hf"), edited)
  assert not os.path.exists(tmp_path / "hf" / "model.safetensors")
  with pytest.raises(errors.CheckpointError, match="adapters"):
    adapters.save(str(tmp_path / "x"), adapters.with_adapters(
        model.params, SITE, (random_adapter(model),)))  # a test-module fn
  out = str(tmp_path / "kj")
  models.save(model, out, edited, format="keditjax")
  loaded = models.load("hf:" + out)
  stack = adapters.at(loaded.params, SITE)
  assert len(stack) == 1 and stack[0].kind == "grace"
  assert stack[0].inputs == ("mlp/key",)
  jax.tree.map(np.testing.assert_array_equal, stack[0].params,
               adapters.at(edited, SITE)[0].params)
  tokens, mask = _tokens(model, TEXTS)
  np.testing.assert_array_equal(
      loaded.apply(loaded.params, tokens, attention_mask=mask),
      model.apply(edited, tokens, attention_mask=mask))
  # Saving again without adapters drops the old adapter files.
  models.save(model, out, model.params, format="keditjax", overwrite=True)
  assert "adapters" not in models.load("hf:" + out).params


SHARDED = r"""
import json, sys
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, %(repo)r)
from keditjax import sharding
from keditjax.models import adapters
from tests.conftest import make_tiny_lm
from tests.test_adapters import random_adapter, SITE, TEXTS, _tokens
assert jax.device_count() == 8
model = make_tiny_lm()
edited = adapters.with_adapters(model.params, SITE, (random_adapter(model),))
tokens, mask = _tokens(model, TEXTS * 4)
want = np.asarray(model.apply(edited, tokens, attention_mask=mask))
plain = np.asarray(model.apply(model.params, tokens, attention_mask=mask))
mesh = sharding.make_mesh(data=4, model=2)
sharded = sharding.shard_model(model, mesh)
ps = jax.device_put(sharded.params)
got = np.asarray(sharded.apply(adapters.with_adapters(sharded.params, SITE,
                 (random_adapter(model),)), tokens, attention_mask=mask))
back = np.asarray(sharded.apply(sharded.params, tokens, attention_mask=mask))
print(json.dumps({"max_diff": float(np.abs(got - want).max()),
                  "changed": float(np.abs(want - plain).max()),
                  "plain_diff": float(np.abs(back - plain).max())}))
"""


def test_sharded_apply_on_8_devices_sees_the_adapter():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SHARDED % {"repo": REPO}],
                        capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["changed"] > 1e-2
  assert report["max_diff"] < 1e-4, report
  assert report["plain_diff"] < 1e-4, report


def test_find_put_grow_set_slot(model):
  """The slot helpers the growing editors (GRACE, T-Patcher, WISE) share."""
  slots = adapters.Adapter(
      {"keys": jnp.arange(6.0).reshape(3, 2), "active": jnp.ones(3, jnp.int32)},
      scale_output, kind="slots")
  other = random_adapter(model)
  params = adapters.with_adapters(model.params, SITE, (other,))
  assert adapters.find(params, SITE, "slots") == (None, None)
  params = adapters.put(params, SITE, "slots", slots)  # appended
  index, found = adapters.find(params, SITE, "slots")
  assert index == 1 and found is slots
  grown = adapters.grow(slots, 4)  # 3 -> 6 slots, zeros after the old ones
  assert grown.params["keys"].shape == (6, 2)
  np.testing.assert_array_equal(grown.params["keys"][:3], slots.params["keys"])
  np.testing.assert_array_equal(grown.params["active"][3:], 0)
  assert adapters.grow(slots, 3) is slots
  written = adapters.set_slot(grown, 4, keys=jnp.array([7.0, 8.0]), active=1)
  np.testing.assert_array_equal(written.params["keys"][4], [7.0, 8.0])
  np.testing.assert_array_equal(grown.params["keys"][4], [0.0, 0.0])  # pure
  replaced = adapters.put(params, SITE, "slots", written)
  assert adapters.at(replaced, SITE)[0] is other
  assert adapters.at(replaced, SITE)[1] is written
  dropped = adapters.put(replaced, SITE, "slots", None)
  assert adapters.at(dropped, SITE) == (other,)
  assert len(adapters.at(params, SITE)) == 2  # the input is untouched
