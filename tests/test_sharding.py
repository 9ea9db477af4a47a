"""Sharding: rule matching in-process, sharded forward on 8 simulated devices.

The device count is fixed when jax initialises, and the rest of the suite runs
in this process on one device, so the 8-device checks run in one subprocess
with `XLA_FLAGS=--xla_force_host_platform_device_count=8` and report JSON.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from keditjax import errors, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs under 8 CPU devices; prints one JSON object on its last line.
SCRIPT = r"""
import json
import numpy as np, jax, jax.numpy as jnp
from keditjax import errors, sharding
from keditjax.models import load, lm, sites as sites_lib

assert jax.device_count() == 8, jax.devices()
report = {"forward": {}, "errors": {}}
rng = np.random.RandomState(0)

def close(a, b, scaled=False):
  # Float32 reduction order differs between layouts; internal activations
  # (|x| ~ 25) get a tolerance relative to their scale.
  a, b = np.asarray(a), np.asarray(b)
  atol = 1e-5 * (max(1.0, float(np.abs(b).max())) if scaled else 1.0)
  return {"max_abs": float(np.abs(a - b).max()),
          "allclose": bool(np.allclose(a, b, rtol=1e-5, atol=atol))}

def shards(x):
  return {"spec": list(x.sharding.spec),
          "shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
          "n": len(x.addressable_shards)}

for name in ("llama_gqa_tied", "qwen2_bias_untied"):
  model = load("hf:tests/golden/" + name)
  tokens = rng.randint(0, model.config.vocab_size, (4, 16)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 11:] = 0
  want, _ = lm.forward(model.config, model.params, tokens, mask)
  for data, mdl in ((2, 4), (8, 1), (2, 3)):
    mesh = sharding.make_mesh(data, mdl)
    fwd = sharding.sharded_forward(model.config, mesh)
    params = sharding.shard_params(model.params, mesh)
    got, _ = fwd(params, tokens, mask)
    odd, _ = fwd(params, tokens[:3], mask[:3])  # padded to the data axis
    attn = params["layers_0"]["self_attn"]
    report["forward"][f"{name}/{data}x{mdl}"] = {
        "full": close(got, want), "odd_batch": close(odd, want[:3]),
        "odd_shape": list(odd.shape),
        "compiles": fwd.jitted._cache_size(),
        "q_proj": shards(attn["q_proj"]["kernel"]),
        "o_proj": shards(attn["o_proj"]["kernel"]),
        "embed": shards(params["embed_tokens"]["embedding"]),
        "norm": shards(params["norm"]["scale"]),
        "logits_spec": list(got.sharding.spec)}

for name in ("gpt2", "gptj"):
  model = load("hf:tests/golden/" + name)
  tokens = rng.randint(0, model.config.vocab_size, (4, 16)).astype(np.int32)
  want, _ = lm.forward(model.config, model.params, tokens)
  mesh = sharding.make_mesh(2, 4)
  params = sharding.shard_params(model.params, mesh)
  got, _ = sharding.sharded_forward(model.config, mesh)(params, tokens)
  report["forward"][f"{name}/2x4"] = {
      "full": close(got, want),
      "sharded_leaves": sum(len(x.sharding.device_set) > 1 and
                            any(a is not None for a in x.sharding.spec)
                            for x in jax.tree.leaves(params))}

model = load("hf:tests/golden/llama_gqa_tied")
mesh = sharding.make_mesh(2, 4)
sharded = sharding.shard_model(model, mesh)
tokens = rng.randint(0, 128, (4, 16)).astype(np.int32)
prompts, conts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]], [[6, 7], [8], [9], [1]]
site = "layer/1/mlp/key"
delta = sites_lib.patch(site, jnp.ones((model.config.intermediate_size,)) * .1)
both = sites_lib.Sites(patches=delta.patches, capture=(site, "layer/0/resid"))
want_l, want_o = model.apply(model.params, tokens, sites=both)
got_l, got_o = sharded.apply(sharded.params, tokens, sites=both)
report["model"] = {
    "apply": close(sharded.apply(sharded.params, tokens),
                   model.apply(model.params, tokens)),
    "patched": close(got_l, want_l),
    "captures": sorted(got_o) == sorted(want_o) and all(
        close(got_o[k], want_o[k], scaled=True)["allclose"] for k in want_o),
    "score": close(sharded.score(sharded.params, prompts, conts),
                   model.score(model.params, prompts, conts)),
    "embed_spec": list(sharded.params["embed_tokens"]["embedding"].sharding.spec),
    "model_unchanged": len(model.params["embed_tokens"]["embedding"].sharding.device_set) == 1}
try:
  sharded.apply(sharded.params, tokens[:3], sites=delta)
  report["errors"]["patched_odd_batch"] = None
except errors.ShardingError as e:
  report["errors"]["patched_odd_batch"] = str(e)
for data, mdl in ((3, 4), (None, 3), (16, 1), (0, 2)):
  try:
    sharding.make_mesh(data, mdl)
    report["errors"][f"{data}x{mdl}"] = None
  except errors.ShardingError as e:
    report["errors"][f"{data}x{mdl}"] = str(e)
report["full_mesh"] = dict(sharding.make_mesh(model=2).shape)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["llama_gqa_tied", "qwen2_bias_untied"])
@pytest.mark.parametrize("mesh", ["2x4", "8x1", "2x3"])
def test_sharded_forward_matches_single_device(report, name, mesh):
  r = report["forward"][f"{name}/{mesh}"]
  assert r["full"]["allclose"], r["full"]
  assert r["odd_batch"]["allclose"], r["odd_batch"]
  assert r["odd_shape"] == [3, 16, 128]
  assert r["compiles"] == 1  # batch 3 is padded to 4: the same compilation
  assert r["norm"]["spec"] == []


@pytest.mark.parametrize("name", ["gpt2", "gptj"])
def test_sharded_forward_other_architectures(report, name):
  r = report["forward"][f"{name}/2x4"]
  assert r["full"]["allclose"], r["full"]
  assert r["sharded_leaves"] >= 8  # the rules matched this architecture's names


def test_params_are_sharded_on_model_axis(report):
  r = report["forward"]["llama_gqa_tied/2x4"]
  # q_proj [64, 64] is column-parallel, o_proj [64, 64] row-parallel, the
  # embedding [128, 64] vocabulary-parallel; 8 shards, replicated over data.
  assert r["q_proj"] == {"spec": [None, "model"],
                         "shapes": [[64, 16]], "n": 8}
  assert r["o_proj"] == {"spec": ["model", None],
                         "shapes": [[16, 64]], "n": 8}
  assert r["embed"]["shapes"] == [[32, 64]]
  assert r["logits_spec"] == ["data", None, "model"]
  pure_data = report["forward"]["llama_gqa_tied/8x1"]
  assert pure_data["q_proj"]["shapes"] == [[64, 64]]


def test_indivisible_dims_fall_back_to_replicated(report):
  # model=3 divides none of 64, 32, 128: everything is replicated.
  r = report["forward"]["llama_gqa_tied/2x3"]
  assert r["q_proj"] == {"spec": [None, None],
                         "shapes": [[64, 64]], "n": 6}
  assert r["embed"]["spec"] == [None, None]
  assert r["logits_spec"] == ["data", None, None]


def test_shard_model_apply_score_and_sites(report):
  r = report["model"]
  assert r["apply"]["allclose"], r["apply"]
  assert r["patched"]["allclose"], r["patched"]
  assert r["captures"]
  assert r["score"]["allclose"], r["score"]
  assert r["embed_spec"] == ["model", None]
  assert r["model_unchanged"]
  assert "batch 3" in report["errors"]["patched_odd_batch"]


def test_bad_mesh_shapes_raise(report):
  e = report["errors"]
  assert "needs 12 devices" in e["3x4"] and "8" in e["3x4"]
  assert "model=3 does not divide the 8 devices" in e["Nonex3"]
  assert "needs 16 devices" in e["16x1"]
  assert e["0x2"] is not None
  assert report["full_mesh"] == {"data": 4, "model": 2}


# -- in-process: rules and specs need no devices ---------------------------

@pytest.mark.parametrize("path,spec", [
    ("layers_0/self_attn/q_proj/kernel", P(None, "model")),
    ("layers_12/self_attn/v_proj/kernel", P(None, "model")),
    ("layers_3/self_attn/k_proj/bias", P("model")),
    ("layers_3/self_attn/o_proj/kernel", P("model", None)),
    ("layers_3/self_attn/o_proj/bias", P()),
    ("layers_1/mlp/gate_proj/kernel", P(None, "model")),
    ("layers_1/mlp/up_proj/kernel", P(None, "model")),
    ("layers_1/mlp/down_proj/kernel", P("model", None)),
    ("layers_1/input_layernorm/scale", P()),
    ("embed_tokens/embedding", P("model", None)),
    ("lm_head/kernel", P(None, "model")),
    ("norm/scale", P()),
    ("h_0/attn/c_attn/kernel", P(None, "model")),
    ("h_0/attn/c_proj/kernel", P("model", None)),
    ("h_0/mlp/c_fc/kernel", P(None, "model")),
    ("h_0/mlp/c_proj/kernel", P("model", None)),
    ("h_0/mlp/c_proj/bias", P()),
    ("wte/embedding", P("model", None)),
    ("wpe/embedding", P()),
    ("h_5/attn/q_proj/kernel", P(None, "model")),
    ("h_5/attn/out_proj/kernel", P("model", None)),
    ("h_5/mlp/fc_in/kernel", P(None, "model")),
    ("h_5/mlp/fc_out/kernel", P("model", None)),
    ("something/else", P()),
])
def test_default_rules(path, spec):
  assert sharding.match_rule(path) == spec


def test_first_matching_rule_wins():
  rules = ((r"mlp/.*kernel$", P("model", None)), (r"kernel$", P(None, "model")))
  assert sharding.match_rule("layers_0/mlp/up_proj/kernel", rules) == P("model", None)
  assert sharding.match_rule("layers_0/self_attn/q_proj/kernel", rules) == P(None, "model")
  assert sharding.match_rule("layers_0/mlp/up_proj/bias", rules) == P()


def test_fit_spec_replicates_indivisible_dims():
  mesh = AbstractMesh((2, 4), ("data", "model"))
  # SmolLM2-135M: hidden 576 = 9 heads x 64, kv 192, MLP 1536, vocab 49152.
  assert sharding.fit_spec(P(None, "model"), (576, 576), mesh) == P(None, "model")
  assert sharding.fit_spec(P("model", None), (49152, 576), mesh) == P("model", None)
  assert sharding.fit_spec(P(None, "model"), (576, 18), mesh) == P(None, None)
  assert sharding.fit_spec(P(("data", "model")), (12,), mesh) == P(None)
  assert sharding.fit_spec(P(("data", "model")), (16,), mesh) == P(("data", "model"))
  assert sharding.fit_spec(P(), (3, 5), mesh) == P()
  with pytest.raises(errors.ShardingError, match="has shape"):
    sharding.fit_spec(P(None, "model"), (64,), mesh, "a/bias")


def test_param_shardings_one_device(tiny_llama):
  mesh = sharding.make_mesh()
  shardings = sharding.param_shardings(tiny_llama.params, mesh)
  assert jax.tree.structure(shardings) == jax.tree.structure(tiny_llama.params)
  q = shardings["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.spec == P(None, "model") and q.mesh.shape == {"data": 1, "model": 1}
  placed = sharding.shard_params(tiny_llama.params, mesh)
  np.testing.assert_array_equal(placed["norm"]["scale"],
                                tiny_llama.params["norm"]["scale"])
  assert sharding.data_sharding(mesh, 3).spec == P("data", None, None)


def test_make_mesh_errors_in_process():
  n = jax.device_count()
  with pytest.raises(errors.ShardingError, match=f"{n} are available"):
    sharding.make_mesh(n + 1)
  with pytest.raises(errors.ShardingError, match="given"):
    sharding.make_mesh(2, 1, devices=jax.devices()[:1])
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  assert mesh.axis_names == ("data", "model")
