"""The "auto" compute dtype and the v* loop's shape buckets."""

import pytest

from keditjax import errors
from keditjax.editors import compute
from keditjax.models import precision

AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512_BF16 = "flags\t\t: fpu avx2 avx512f avx512_bf16\n"
NEOVERSE = "Features\t: fp asimd bf16 i8mm\n"


def test_auto_is_bfloat16_only_with_native_support():
  assert precision.resolve("auto", "cpu", AVX2) == "float32"
  assert precision.resolve("auto", "cpu", AVX512_BF16) == "bfloat16"
  assert precision.resolve("auto", "cpu", NEOVERSE) == "bfloat16"
  assert precision.resolve("auto", "cpu", "") == "float32"
  assert precision.resolve("auto", "gpu", AVX2) == "bfloat16"
  assert precision.resolve("auto", "tpu", AVX2) == "bfloat16"
  for name in ("float32", "bfloat16"):  # explicit choices are kept
    assert precision.resolve(name, "cpu", AVX2) == name
  with pytest.raises(errors.ConfigError, match="float16"):
    precision.resolve("float16")


def test_editor_defaults_resolve_to_a_concrete_dtype():
  from keditjax import editors
  for method in ("rome", "memit", "alphaedit"):
    hp = editors.get(method).hparams
    assert hp.v_compute_dtype == "auto"
    assert compute.value_hparams(hp).compute_dtype in ("float32", "bfloat16")
  with pytest.raises(errors.ConfigError, match="compute_dtype"):
    compute.value_hparams(editors.get("rome", v_compute_dtype="fp8").hparams)


def test_buckets():
  assert [compute.suffix_bucket(n) for n in (1, 4, 5, 6, 7, 8, 9, 17)] == [
      4, 4, 6, 6, 8, 8, 16, 24]
  assert [compute.target_bucket(n) for n in (1, 2, 3, 4, 5, 9)] == [
      1, 3, 3, 4, 8, 12]
