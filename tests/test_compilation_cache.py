"""The persistent compilation cache: a new process reuses compiled programs,
and never a wrong one (another model, another config, another CPU)."""

import json
import os
import subprocess
import sys

import pytest

from keditjax import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A new process: enable the cache, run a tiny decoder's jitted forward pass,
# report JAX's cache events and the logits.
_CHILD = r"""
import json, sys
from keditjax import compilation_cache
folder = compilation_cache.enable(sys.argv[1])
import jax, numpy as np
from jax._src import monitoring
events = []
monitoring.register_event_listener(lambda e, **kw: events.append(e))
from keditjax.models import lm
from tests.conftest import make_tiny_lm
model = make_tiny_lm(num_layers=int(sys.argv[2]), seed=int(sys.argv[3]))
tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % model.config.vocab_size
logits, _ = lm.forward(model.config, model.params, tokens)
print(json.dumps({"folder": folder,
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses"),
                  "logits": np.asarray(logits, np.float64).ravel()[:64].tolist()}))
"""


def _run(cache, layers, seed):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("KEDITJAX_COMPILATION_CACHE", None)
  out = subprocess.run([sys.executable, "-c", _CHILD, str(cache), str(layers),
                        str(seed)], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_reuses_entries_and_never_a_wrong_one(tmp_path):
  cache = tmp_path / "xla"
  first = _run(cache, 2, 0)
  assert first["folder"].startswith(str(cache)) and first["misses"] > 0
  assert first["hits"] == 0 and os.listdir(first["folder"])
  again = _run(cache, 2, 0)
  assert again["hits"] > 0 and again["misses"] == 0
  assert again["logits"] == first["logits"]
  # Other weights, same shapes: the same program (weights are arguments),
  # and the logits of *those* weights, as computed without any cache.
  other = _run(cache, 2, 1)
  uncached = _run("off", 2, 1)
  assert other["hits"] > 0 and uncached["folder"] is None
  assert uncached["hits"] == 0
  assert other["logits"] == uncached["logits"] != first["logits"]
  # Another architecture (a layer more): new programs, not old entries.
  deeper = _run(cache, 3, 0)
  assert deeper["misses"] > 0


def test_entries_are_namespaced_by_jax_version_and_cpu(monkeypatch, tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  name = compilation_cache.namespace()
  assert f"jax-{jax.__version__}" in name and "-cpu-" in name
  monkeypatch.setattr(compilation_cache, "_cpu_fingerprint", lambda: "other")
  assert compilation_cache.namespace() != name
  # The environment variable and the default folder.
  monkeypatch.setenv("KEDITJAX_CACHE", str(tmp_path / "kc"))
  assert compilation_cache.default_dir() == str(tmp_path / "kc" / "xla")


@pytest.fixture
def restore_jax_cache_config():
  import jax  # pylint: disable=import-outside-toplevel
  names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes",
           "jax_compilation_cache_max_size")
  saved = {n: getattr(jax.config, n) for n in names}
  yield
  for n, v in saved.items():
    jax.config.update(n, v)


def test_enable_sets_jax_options_and_off_disables(monkeypatch, tmp_path,
                                                  restore_jax_cache_config):
  import jax  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("KEDITJAX_COMPILATION_CACHE", str(tmp_path / "c"))
  folder = compilation_cache.enable()
  assert folder == str(tmp_path / "c" / compilation_cache.namespace())
  assert jax.config.jax_compilation_cache_dir == folder
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
  assert jax.config.jax_enable_compilation_cache
  monkeypatch.setenv("KEDITJAX_COMPILATION_CACHE", "off")
  assert compilation_cache.enable() is None
  assert not jax.config.jax_enable_compilation_cache
