r"""What the v* loop's shape buckets cost and save (issue 19).

  python -m experiments.bench_buckets --num_records=12 \
      --output_json=docs/benchmarks/vstar_buckets_avx2.json
  python -m experiments.bench_buckets --memory_only \
      --output_json=docs/benchmarks/vstar_memory_avx2.json

For the bucket sets `old` (suffix 1,2,3,4,6,8; target 1,2,3,4,6,8; prefix
a multiple of 16: before issue 19), `new` (`compute.SUFFIX_BUCKETS`,
`TARGET_BUCKETS`, `PREFIX_MULTIPLE`) and `prefix32` (`new` with the prefix
at multiples of 32, tried first): how many distinct v* shapes the first
`--shape_records` CounterFact records need (each one compiles `_prepare` and
`_optimize` once), and the value phase's seconds at a fixed `--steps` (no
early stop) on `--num_records` records, each timed compiled (its second
edit), so that only padding differs.
"""

import collections
import json
import os
import statistics

import numpy as np

from absl import app, flags

from experiments import common  # noqa: F401  (defines --compilation_cache)
from keditjax import data, editors, models
from keditjax.editors import compute
from keditjax.models import lm, precision

_N = flags.DEFINE_integer("num_records", 12, "Records timed per bucket set.")
_SHAPES = flags.DEFINE_integer("shape_records", 2000, "Records whose shapes are counted.")
_STEPS = flags.DEFINE_integer("steps", 10, "v* steps per edit (no early stop).")
_OUT = flags.DEFINE_string("output_json", None, "Where to write the results.")
_MEMORY = flags.DEFINE_bool("memory_only", False, "Instead: XLA's memory analysis of the v* "
                            "programs (`_prepare`, `_optimize`) for one record, float32 and "
                            "bfloat16 compute (bytes of arguments, outputs, temporaries).")

SETS = {"old": ((1, 2, 3, 4, 6, 8), (1, 2, 3, 4, 6, 8), 16),
        "prefix32": (compute.SUFFIX_BUCKETS, compute.TARGET_BUCKETS, 32),
        "new": (compute.SUFFIX_BUCKETS, compute.TARGET_BUCKETS, compute.PREFIX_MULTIPLE)}


def _use(name):
  compute.SUFFIX_BUCKETS, compute.TARGET_BUCKETS, compute.PREFIX_MULTIPLE = SETS[name]


def _raw_shape(model, request, templates):
  rows, *_ = compute.value_rows(model, [request], templates)
  return (max(last for _, last, _ in rows),
          max(len(ids) - last + max(len(t) - 1, 0) for ids, last, t in rows),
          max(max(len(t), 1) for _, _, t in rows))


def memory_analysis(model, state, record) -> dict:
  """Sizes (MiB) XLA reports for the compiled v* programs, by compute dtype."""
  out = {}
  real = {name: getattr(compute, name) for name in ("_prepare", "_optimize")}
  for dtype in ("float32", "bfloat16"):
    got = {}

    def spy(name):
      def call(*args, **kwargs):
        analysis = real[name].lower(*args, **kwargs).compile().memory_analysis()
        got[name] = {k: getattr(analysis, f"{k}_size_in_bytes") / 2**20
                     for k in ("argument", "output", "temp")}
        return real[name](*args, **kwargs)
      return call
    try:
      for name in real:
        setattr(compute, name, spy(name))
      editors.get("rome", v_compute_dtype=dtype, v_steps=1).apply(
          model, model.params, record, state)
    finally:
      for name, fn in real.items():
        setattr(compute, name, fn)
    out[dtype] = got
  return out


def main(argv):
  del argv
  model = models.load()
  editor = editors.get("rome")
  state = editor.init(model)
  records = data.read_records("counterfact")
  if _MEMORY.value:
    report = {"model": model.name, "record": 0,
              "mib": memory_analysis(model, state, records[0])}
    print(json.dumps(report))
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(report, f, indent=1)
    return
  requests = [editors.base.make_requests(r)[0] for r in records[:_SHAPES.value]]
  raw = [_raw_shape(model, r, state.templates) for r in requests]
  report = {"model": model.name, "auto_compute_dtype": precision.resolve("auto"),
            "steps": _STEPS.value, "shape_records": len(raw), "sets": {}}
  timed = editors.get("rome", v_stop_loss=0.0, v_steps=_STEPS.value)
  for name in SETS:
    _use(name)
    shapes = collections.Counter(
        (lm.bucket(s, compute.PREFIX_MULTIPLE), compute.suffix_bucket(p),
         compute.target_bucket(t)) for s, p, t in raw)
    seconds = []
    for record in records[:_N.value]:
      timed.apply(model, model.params, record, state)  # compiles its shape
      _, _, info = timed.apply(model, model.params, record, state)
      seconds.append(info.seconds["value"])
    report["sets"][name] = {
        "suffix_buckets": list(SETS[name][0]), "target_buckets": list(SETS[name][1]),
        "prefix_multiple": SETS[name][2], "distinct_shapes": len(shapes),
        "shape_counts": {"x".join(map(str, k)): v for k, v in shapes.most_common()},
        "value_s": seconds, "value_s_total": sum(seconds),
        "value_s_median": statistics.median(seconds)}
    print(name, len(shapes), "shapes;", f"{sum(seconds):.2f} s", flush=True)
  report["timed_raw_shapes"] = [list(s) for s in raw[:_N.value]]
  # Seconds per `--steps` steps as a + b·suffix + c·prefix + d·target (the
  # padded lengths) over every timed edit, then each set's mean over the
  # `--shape_records` distribution: what its padding costs a typical edit.
  rows, secs = [], []
  for name, (suffix, target, multiple) in SETS.items():
    _use(name)
    for (s, p, t), sec in zip(raw, report["sets"][name]["value_s"]):
      rows.append([1.0, compute.suffix_bucket(p), lm.bucket(s, multiple),
                   compute.target_bucket(t)])
      secs.append(sec)
  coef = np.linalg.lstsq(np.array(rows), np.array(secs), rcond=None)[0]
  report["fit_s_per_steps"] = dict(zip(
      ("intercept", "suffix_token", "prefix_token", "target_token"), coef.tolist()))
  for name in SETS:
    _use(name)
    report["sets"][name]["expected_value_s"] = float(np.mean([
        coef @ [1.0, compute.suffix_bucket(p), lm.bucket(s, compute.PREFIX_MULTIPLE),
                compute.target_bucket(t)] for s, p, t in raw]))
  _use("new")
  base = report["sets"]["old"]["expected_value_s"]
  for name in SETS:
    report["sets"][name]["expected_padding_cost"] = (
        report["sets"][name]["expected_value_s"] / base - 1)
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)
