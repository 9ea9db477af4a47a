"""Shared fixtures: tiny golden checkpoints and the real default model."""

import os

import numpy as np
import pytest

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


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
