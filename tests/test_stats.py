"""Key second moments: the kernel, corpus packing, caching, resuming, sharding.

The tiny Llama checkpoint gets a word-level tokenizer (`w{i}` -> id i, EOS
127 separates texts), so the reference below can pack the corpus on its own
and compare with a direct NumPy computation over captured keys.
"""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keditjax import data as keditjax_data
from keditjax import errors, stats
from keditjax.kernels import covariance
from keditjax.models import lm, load
from keditjax.models import sites as sites_lib
from tests.conftest import golden_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 127
SEQ, BATCH = 16, 4  # every tiny-model test shares one compilation per layer set


def _tiny_model(name="llama_gqa_tied"):
  from tokenizers import Tokenizer as Backend, models, pre_tokenizers
  from keditjax.models.lm import LanguageModel
  from keditjax.models.tokenizer import Tokenizer
  base = load("hf:" + golden_dir(name))
  backend = Backend(models.WordLevel({f"w{i}": i for i in range(EOS)},
                                     unk_token="w0"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return LanguageModel(base.config, base.params,
                       Tokenizer(backend, eos_id=EOS), name="tiny")


@pytest.fixture(scope="module")
def model():
  return _tiny_model()


def _clean_lines(seed, n=40):
  rng = np.random.default_rng(seed)
  return [" ".join(f"w{i}" for i in rng.integers(0, 120, rng.integers(3, 30)))
          for _ in range(n)]


def _write_corpus(path, lines):
  """WikiText-style: headings, blank lines and <unk> around `lines`."""
  with open(path, "w") as f:
    f.write(" \n = w1 w2 = \n \n")
    for i, line in enumerate(lines):
      words = line.split()
      words.insert(i % len(words), "<unk>")
      f.write(" " + " ".join(words) + " \n")
      if i % 7 == 3:
        f.write(" \n = = w3 = = \n")
  return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  lines = _clean_lines(0)
  return _write_corpus(tmp_path_factory.mktemp("corpus") / "a.txt",
                       lines), lines


def _reference(model, lines, layer, num_tokens, seq_len=SEQ):
  """E[k kᵀ] by packing independently and running each row unpadded."""
  ids = []
  for line in lines:
    ids += [int(w[1:]) for w in line.split()] + [EOS]
  ids = ids[:num_tokens]
  keys = []
  for start in range(0, len(ids), seq_len):
    row = np.asarray([ids[start:start + seq_len]], np.int32)
    _, out = lm.forward(model.config, model.params, row,
                        sites=sites_lib.capture(stats.site(layer)))
    keys.append(np.asarray(out[stats.site(layer)][0], np.float64))
  keys = np.concatenate(keys)
  return keys.T @ keys / len(keys), len(keys)


def _moments(model, corpus, layers, tmp_path, **kwargs):
  kwargs = {"num_tokens": 150, "seq_len": SEQ, "batch_size": BATCH,
            "cache_dir": str(tmp_path / "cache"), "progress": False, **kwargs}
  return stats.moments(model, layers, corpus=corpus, **kwargs)


# -- kernel -------------------------------------------------------------------


def test_accumulate_matches_numpy_including_padding():
  rng = np.random.default_rng(0)
  mom2, count = covariance.init(8)
  want, want_count = np.zeros((8, 8)), 0
  for n in (5, 12):
    keys = rng.normal(size=(n, 8)).astype(np.float32) * 3
    mask = rng.random(n) < 0.6
    keys[~mask] = np.nan  # padding rows may hold anything, NaN included
    mom2, count = covariance.accumulate(mom2, count, keys, mask)
    real = keys[mask].astype(np.float64)
    want, want_count = want + real.T @ real, want_count + int(mask.sum())
  assert mom2.dtype == jnp.float32 and int(count) == want_count
  np.testing.assert_allclose(np.asarray(mom2), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(covariance.finalize(mom2, count),
                             want / int(count), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blocks", [2, 3, 5])
def test_blocked_outer_sum_is_exact_and_symmetric(blocks):
  rng = np.random.default_rng(blocks)
  keys = rng.normal(size=(30, 13)).astype(np.float32)
  mask = rng.random(30) < 0.7
  got = np.asarray(jax.jit(lambda k, m: covariance.outer_sum(
      k, m, jnp.float32, blocks=blocks))(keys, mask))
  real = keys[mask].astype(np.float64)
  np.testing.assert_allclose(got, real.T @ real, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got, got.T)


def test_accumulate_float64():
  rng = np.random.default_rng(1)
  keys = rng.normal(size=(20, 6)).astype(np.float32)
  mask = np.arange(20) < 17
  with jax.enable_x64(True):
    mom2, count = covariance.init(6, "float64")
    mom2, count = covariance.accumulate(mom2, count, keys, mask)
    assert mom2.dtype == jnp.float64
    got = np.asarray(mom2)
  real = keys[:17].astype(np.float64)
  np.testing.assert_allclose(got, real.T @ real, rtol=1e-13)
  assert int(count) == 17
  with pytest.raises(errors.ConfigError, match="float32"):
    covariance.init(6, "float16")
  with pytest.raises(errors.InputError, match="count=0"):
    covariance.finalize(np.zeros((2, 2)), 0)


def test_check_covariance():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(50, 8))
  good = a.T @ a / 50
  assert covariance.check_covariance(good) is not None
  bad = good.copy()
  bad[1, 2] = np.nan
  with pytest.raises(errors.InputError, match="NaN"):
    covariance.check_covariance(bad, "layer 3")
  singular = a[:, :3] @ rng.normal(size=(3, 8))
  singular = singular.T @ singular
  with pytest.raises(errors.InputError, match="singular"):
    covariance.check_covariance(singular, "C")
  covariance.check_covariance(singular, rcond=0)  # PSD is fine for AlphaEdit
  few = rng.normal(size=(20, 32)).astype(np.float32)  # rank 20 < 32, float32
  few_C = np.asarray(covariance.outer_sum(few, np.ones(20, bool), jnp.float32))
  with pytest.raises(errors.InputError, match="singular"):
    covariance.check_covariance(few_C)
  covariance.check_covariance(few_C, rcond=0)
  ill = np.diag(np.geomspace(1, 1e-6, 8)).astype(np.float32)  # real-world κ
  covariance.check_covariance(ill)
  with pytest.raises(errors.InputError, match="semi-definite"):
    covariance.check_covariance(good - 2 * np.eye(8) * good.max(), rcond=0)
  with pytest.raises(errors.InputError, match="symmetric"):
    covariance.check_covariance(good + np.triu(good, 1))
  with pytest.raises(errors.InputError, match="zeros"):
    covariance.check_covariance(np.zeros((3, 3)))
  with pytest.raises(errors.InputError, match="square"):
    covariance.check_covariance(np.zeros((3, 4)))


# -- corpus ---------------------------------------------------------------------


def test_corpus_texts_drop_unk_headings_and_blanks(corpus):
  path, lines = corpus
  assert list(stats.corpus_texts(path)) == lines
  directory = os.path.dirname(path)
  assert list(stats.corpus_texts(directory)) == lines
  assert list(stats.corpus_texts([path, path])) == lines + lines


def test_default_corpus_is_wikitext2_train():
  texts = stats.corpus_texts()
  first = next(texts)
  assert first.startswith("The 2013 – 14 season was the season of")  # <unk> gone
  assert "<unk>" not in "".join(next(texts) for _ in range(200))


def test_packed_rows_are_full_and_stop_at_num_tokens(model, corpus):
  _, lines = corpus
  rows = list(stats.packed_rows(model.tokenizer, lines, SEQ, num_tokens=150))
  assert [len(r) for r in rows] == [SEQ] * 9 + [6]
  whole = list(stats.packed_rows(model.tokenizer, lines, SEQ))
  total = sum(len(l.split()) + 1 for l in lines)
  assert sum(map(len, whole)) == total and len(whole[-1]) == total % SEQ


def test_datasets_corpus(model, corpus, monkeypatch):
  datasets = pytest.importorskip("datasets")
  _, lines = corpus
  data = datasets.Dataset.from_dict({"text": lines})
  assert list(stats.corpus_texts(data)) == lines
  seen = {}
  def fake_load(name, config=None, split=None):
    seen.update(name=name, config=config, split=split)
    return data
  monkeypatch.setattr(datasets, "load_dataset", fake_load)
  # As on a machine with network: the hub answers, then `datasets` loads.
  monkeypatch.setattr(keditjax_data, "hub_reachable", lambda: (True, ""))
  assert list(stats.corpus_texts("hf:wikitext:wikitext-2-raw-v1:train")) == lines
  assert seen == {"name": "wikitext", "config": "wikitext-2-raw-v1",
                  "split": "train"}
  with pytest.raises(errors.InputError, match="text"):
    stats.corpus_texts(datasets.Dataset.from_dict({"body": lines}))


# -- second moments ---------------------------------------------------------------


def test_second_moments_equal_numpy_over_captured_keys(model, corpus, tmp_path):
  path, lines = corpus
  # 150 tokens: 9 full rows, a 6-token row, a batch with 2 padding rows.
  got = _moments(model, path, [1, 0], tmp_path)
  assert list(got) == [0, 1]
  for layer in (0, 1):
    want, count = _reference(model, lines, layer, 150)
    assert got[layer].count == count == 150
    assert got[layer].mom2.shape == (128, 128)
    np.testing.assert_allclose(got[layer].mom2, want, rtol=2e-5,
                               atol=1e-5 * np.abs(want).max())
  alone = stats.second_moments(model, 0, corpus=path, num_tokens=150,
                               seq_len=SEQ, batch_size=BATCH, cache_dir=False,
                               progress=False)
  np.testing.assert_allclose(alone[0], got[0].mom2, rtol=1e-6, atol=1e-7)


def test_float64_accumulators(model, corpus, tmp_path):
  path, lines = corpus
  got = _moments(model, path, 1, tmp_path, dtype="float64")[1]
  assert got.mom2.dtype == np.float64
  want, _ = _reference(model, lines, 1, 150)
  np.testing.assert_allclose(got.mom2, want, rtol=2e-5,
                             atol=1e-5 * np.abs(want).max())
  assert jnp.zeros(1).dtype == jnp.float32  # 64-bit mode did not leak


def test_bfloat16_compute_is_close(model, corpus, tmp_path):
  path, _ = corpus
  exact = _moments(model, path, 1, tmp_path)[1]
  fast = _moments(model, path, 1, tmp_path, compute_dtype="bfloat16")[1]
  assert fast.fingerprint != exact.fingerprint and fast.mom2.dtype == np.float32
  error = np.abs(fast.mom2 - exact.mom2).max() / np.abs(exact.mom2).max()
  assert 0 < error < 3e-2, error


def test_cache_hit_does_not_recompute(model, corpus, tmp_path, monkeypatch):
  path, _ = corpus
  first = _moments(model, path, 1, tmp_path)[1]
  assert os.path.exists(first.path)
  def boom(*args, **kwargs):
    raise AssertionError("recomputed despite a cache hit")
  monkeypatch.setattr(stats, "_accumulate_step", boom)
  # NumPy spellings of the same recipe hit the same file.
  again = _moments(model, path, 1, tmp_path, num_tokens=np.int64(150),
                   dtype=np.float32)[1]
  np.testing.assert_array_equal(again.mom2, first.mom2)
  assert again.count == first.count and again.fingerprint == first.fingerprint


def test_fingerprints_follow_what_the_keys_depend_on(model, corpus, tmp_path):
  path, lines = corpus
  fp = lambda m=model, **kw: stats.fingerprints(
      m, [0, 1], **{"corpus": path, "seq_len": SEQ, "num_tokens": 150, **kw})
  base = fp()
  assert base[0] != base[1]
  assert fp() == base
  other = _write_corpus(tmp_path / "b.txt", _clean_lines(1))
  assert set(fp(corpus=other).values()).isdisjoint(base.values())
  for change in ({"num_tokens": 151}, {"seq_len": 8}, {"dtype": "float64"},
                 {"compute_dtype": "bfloat16"}):
    assert set(fp(**change).values()).isdisjoint(base.values()), change

  def edited(path_, delta=1e-3):
    params = jax.tree.map(lambda x: x, model.params)
    node = params
    for part in path_[:-1]:
      node = node[part]
    node[path_[-1]] = node[path_[-1]] + delta
    return type(model)(model.config, params, model.tokenizer)
  # Layer 1's keys feed its output projection: editing it (ROME) keeps both.
  assert fp(edited(model.site_param("layer/1/mlp/value"))) == base
  # Layer 1's input projection changes layer 1's keys, not layer 0's.
  up = fp(edited(model.site_param("layer/1/mlp/key")))
  assert up[0] == base[0] and up[1] != base[1]
  # Layer 0's output projection feeds layer 1 only.
  down = fp(edited(model.site_param("layer/0/mlp/value")))
  assert down[0] == base[0] and down[1] != base[1]
  # Layer 0's attention and the embeddings change both.
  for leaf in ("layer/0/attn/out", "embed"):
    changed = fp(edited(model.site_param(leaf)))
    assert changed[0] != base[0] and changed[1] != base[1], leaf


def test_corrupt_cache_is_detected_and_recomputed(model, corpus, tmp_path):
  path, _ = corpus
  good = _moments(model, path, 1, tmp_path)[1]
  blob = open(good.path, "rb").read()

  # Truncated (a crash while copying), bit rot, and a well-formed file whose
  # numbers were changed without its checksum.
  data = dict(np.load(good.path))
  data["mom2_sum"] = data["mom2_sum"] * 2
  np.savez(tmp_path / "tampered.npz", **data)
  tampered = open(tmp_path / "tampered.npz", "rb").read()
  flipped = bytearray(blob)
  flipped[len(blob) // 2] ^= 0xFF
  for bad in (blob[:len(blob) // 3], bytes(flipped), tampered, b""):
    with open(good.path, "wb") as f:
      f.write(bad)
    with pytest.warns(UserWarning, match="corrupt"):
      again = _moments(model, path, 1, tmp_path)[1]
    np.testing.assert_allclose(again.mom2, good.mom2, rtol=1e-6)
    assert open(good.path, "rb").read() != bad  # rewritten, valid again
    np.testing.assert_array_equal(_moments(model, path, 1, tmp_path)[1].mom2,
                                  again.mom2)


def test_unwritable_cache_warns_and_still_returns(model, corpus, tmp_path):
  path, _ = corpus
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.warns(UserWarning, match="cannot write"):
    got = _moments(model, path, 1, tmp_path, cache_dir=str(blocker / "c"))[1]
  assert got.path is None and got.count == 150


def test_resume_after_interruption_equals_uninterrupted(model, corpus, tmp_path,
                                                        monkeypatch):
  path, _ = corpus
  whole = _moments(model, path, [0, 1], tmp_path / "whole", num_tokens=300)
  real_step, calls = stats._accumulate_step, []

  def interrupted(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt  # Ctrl-C during the third batch
    return real_step(*args, **kwargs)
  monkeypatch.setattr(stats, "_accumulate_step", interrupted)
  with pytest.raises(KeyboardInterrupt):
    _moments(model, path, [0, 1], tmp_path, num_tokens=300,
             checkpoint_every_s=3600)  # saved on the way out, not on time
  partial = [f for f in os.listdir(tmp_path / "cache")
             if f.startswith("partial-")]
  assert len(partial) == 1

  calls.clear()
  monkeypatch.setattr(stats, "_accumulate_step", lambda *a, **k: (
      calls.append(1), real_step(*a, **k))[1])
  resumed = _moments(model, path, [0, 1], tmp_path, num_tokens=300)
  assert len(calls) == 3  # 19 rows: 5 batches, 2 of them done before
  for layer in (0, 1):
    assert resumed[layer].count == whole[layer].count == 300
    np.testing.assert_allclose(resumed[layer].mom2, whole[layer].mom2,
                               rtol=1e-6, atol=1e-8)
  assert not [f for f in os.listdir(tmp_path / "cache")
              if f.startswith("partial-")]


def test_bad_inputs_raise_keditjax_errors(model, corpus, tmp_path):
  path, _ = corpus
  with pytest.raises(errors.ConfigError, match=r"0\.\.1"):
    _moments(model, path, 2, tmp_path)
  with pytest.raises(errors.ConfigError, match="empty"):
    _moments(model, path, [], tmp_path)
  for kwargs, match in (({"dtype": "float16"}, "dtype"),
                        ({"seq_len": 65}, "max_position"),
                        ({"num_tokens": 0}, "num_tokens"),
                        ({"batch_size": 0}, "batch_size")):
    with pytest.raises(errors.ConfigError, match=match):
      _moments(model, path, 0, tmp_path, **kwargs)
  with pytest.raises(errors.InputError, match="neither a file"):
    _moments(model, str(tmp_path / "missing.txt"), 0, tmp_path)
  empty = tmp_path / "empty.txt"
  empty.write_text(" \n = w1 = \n \n <unk> \n")
  with pytest.raises(errors.InputError, match="no tokens"):
    _moments(model, str(empty), 0, tmp_path)
  bare = type(model)(model.config, model.params, None)
  with pytest.raises(errors.TokenizerError):
    _moments(bare, path, 0, tmp_path)


# -- data parallel: 8 simulated devices in a subprocess -------------------------

SCRIPT = r"""
import json, sys
import jax, numpy as np
from keditjax import sharding, stats
from tests.test_stats import _tiny_model
assert jax.device_count() == 8, jax.devices()
model = _tiny_model(sys.argv[2])
kw = dict(corpus=sys.argv[1], num_tokens=200, seq_len=16, batch_size=8,
          cache_dir=False, progress=False)
want = stats.moments(model, [0, 1], mesh=None, **kw)
report = {}
step, meshes = stats._accumulate_step, []
stats._accumulate_step = lambda *a, **k: (meshes.append(k["mesh"]),
                                          step(*a, **k))[1]
auto = stats.moments(model, [0, 1], **dict(kw, batch_size=3))  # -> 8 rows
stats._accumulate_step = step
report["auto"] = {"count": [auto[l].count for l in (0, 1)], "max_rel": max(
    float(np.abs(auto[l].mom2 - want[l].mom2).max() /
          np.abs(want[l].mom2).max()) for l in (0, 1)),
    "mesh": dict(meshes[0].shape)}
for data, mdl in ((8, 1), (2, 4)):
  got = stats.moments(model, [0, 1], mesh=sharding.make_mesh(data, mdl), **kw)
  report[f"{data}x{mdl}"] = {
      "count": [got[l].count for l in (0, 1)],
      "max_rel": max(float(np.abs(got[l].mom2 - want[l].mom2).max() /
                         np.abs(want[l].mom2).max()) for l in (0, 1))}
try:
  stats.moments(model, 0, mesh=sharding.make_mesh(8, 1),
                **dict(kw, batch_size=4))
except Exception as e:
  report["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(report))
"""


@pytest.mark.parametrize("name", ["llama_gqa_tied", "gpt2"])
def test_data_parallel_on_8_devices_equals_one(corpus, name):
  path, _ = corpus
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-c", SCRIPT, path, name], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-5000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for mesh in ("8x1", "2x4", "auto"):
    assert report[mesh]["count"] == [200, 200]
    assert report[mesh]["max_rel"] < 1e-5, report
  assert report["auto"]["mesh"] == {"data": 8, "model": 1}
  assert report["error"].startswith("ConfigError") and "data" in report["error"]


# -- throughput on the real model (printed, not asserted) ------------------------


def test_smollm2_layer4_throughput(smollm2, capsys):
  """Prints tokens/s; `experiments.benchmark --task=stats` measures properly."""
  kw = dict(num_tokens=3 * stats.DEFAULT_SEQ_LEN * stats.DEFAULT_BATCH_SIZE,
            cache_dir=False, progress=False)
  lines = []
  for compute_dtype in ("float32", "bfloat16"):
    stats.moments(smollm2, 4, compute_dtype=compute_dtype, **kw)  # compile
    start = time.perf_counter()
    got = stats.moments(smollm2, 4, compute_dtype=compute_dtype, **kw)[4]
    steady = time.perf_counter() - start
    assert got.count == kw["num_tokens"] and np.isfinite(got.mom2).all()
    lines.append(f"{compute_dtype}: {got.count / steady:.0f} tokens/s")
  with capsys.disabled():
    print(f"\nSmolLM2-135M layer 4 E[kk^T], steady state: {', '.join(lines)}")
