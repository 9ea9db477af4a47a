"""Shared fixtures: tiny golden checkpoints and the real default model."""

import gc
import os

import numpy as np
import pytest

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_executables():
  """Frees every test module's compiled executables when it ends.

  Each XLA:CPU executable holds its own memory mappings; the whole suite in
  one process kept ~100k of them alive and crossed the kernel's limit
  (vm.max_map_count, 65530), after which LLVM aborted mid-compile (CI exit
  139/134 in test_tracing). Modules share no jitted functions, so this costs
  no recompiles within a module."""
  yield
  import jax  # pylint: disable=import-outside-toplevel
  jax.clear_caches()
  gc.collect()


def golden_dir(name: str) -> str:
  return os.path.join(GOLDEN, name)


def golden_arrays(name: str) -> dict:
  return dict(np.load(os.path.join(GOLDEN, name, "golden.npz")))


@pytest.fixture(scope="session")
def tiny_llama():
  from keditjax.models import load
  return load("hf:" + golden_dir("llama_gqa_tied"))


@pytest.fixture(scope="session")
def smollm2():
  """The real default model (SmolLM2-135M from the bundled GGUF)."""
  from keditjax.models import load
  try:
    return load("smollm2-135m")
  except Exception as e:  # pragma: no cover - the package is a test dependency.
    pytest.fail(f"default model unavailable: {e}")


def byte_tokenizer():
  """A byte-level tokenizer (256 byte tokens + BOS/EOS), no merges."""
  from keditjax.models.tiny import byte_tokenizer as make
  return make()


def make_tiny_lm(num_layers=4, seed=0, arch="llama"):
  """A random tiny decoder with a byte tokenizer (for editor tests)."""
  from keditjax.models.tiny import tiny_lm
  return tiny_lm(num_layers, seed, arch)


@pytest.fixture(scope="session")
def tiny_lm():
  return make_tiny_lm()
