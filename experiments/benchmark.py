r"""Benchmarks compile time, steady-state latency and throughput.

  python -m experiments.benchmark --task=forward --output_json=/tmp/bench.json \
      [--model=smollm2-135m] [--batch_sizes=1,8] [--lengths=16,128] [--steps=10]

  python -m experiments.benchmark --task=lifelong --method=ultraedit --num_edits=1000 \
      --lifelong_batch=100
  python -m experiments.benchmark --task=stats [--stats_layers=4] [--stats_tokens=16384]
  python -m experiments.benchmark --task=arch --arch_method=wise  # experiments/bench_arch.py
  python -m experiments.benchmark --task=train --train_config=experiments/configs/mend_tiny_synthetic.py

Each task maps a loaded model to rows of measurements. `compile_s` is the
first call (trace + compile + one run) minus the steady median; `compiles` is
the number of XLA compilations that first call triggered (steady calls must
trigger none, STYLE.md §4).
"""

import json
import os
import resource
import statistics
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments import bench_arch, bench_edit, bench_train
from experiments import common  # noqa: F401  (defines --compilation_cache)
from keditjax import compilation_cache, memory, models
from keditjax.models import precision
from keditjax.models import lm

_TASK = flags.DEFINE_enum("task", "forward", ["forward", "generate", "stats", "edit", "lifelong", "score", "train",
                               "arch"],
                              "What to time.")
_MODEL = flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model name for load().")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes.")
_LENGTHS = flags.DEFINE_list("lengths", ["16", "128"], "Sequence lengths (forward).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steady-state calls.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "Tokens to generate.")
_OUTPUT = flags.DEFINE_string("output_json", None, "Where to write the results.")
_STATS_LAYERS = flags.DEFINE_list("stats_layers", ["4"], "Layers of one E[kk^T] pass (stats).")
_STATS_TOKENS = flags.DEFINE_integer("stats_tokens", 16384, "WikiText-2 tokens per stats call.")
_STATS_COMPUTE = flags.DEFINE_list("stats_compute_dtypes", ["float32", "bfloat16"],
                                   "stats.moments compute_dtype values to time.")

_compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **_: _compiles.append(secs)
    if event == "/jax/core/compile/backend_compile_duration" else None)


def measure(call, work: int) -> dict:
  """Times `call()` (which must block) once cold, then `--steps` times warm."""
  before = len(_compiles)
  start = time.perf_counter()
  call()
  first = time.perf_counter() - start
  compiles = len(_compiles) - before
  call()  # warm-up
  steady_compiles = len(_compiles)
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  if len(_compiles) != steady_compiles:
    raise RuntimeError(f"steady-state calls recompiled {len(_compiles) - steady_compiles}x")
  steady = statistics.median(times)
  return {"first_call_s": first, "compile_s": first - steady, "compiles": compiles,
          "backend_compile_s": sum(_compiles[before:before + compiles]),
          "steady_s": steady, "tokens_per_s": work / steady}


_GRACE = flags.DEFINE_list("grace_entries", ["0"], "forward: GRACE codebook sizes at layer 24 "
                           "(0: no adapter), to price an architectural edit.")


def bench_forward(model, params):
  """`lm.forward` logits for random tokens of every (batch, length[, codebook])."""
  rows, rng = [], np.random.default_rng(0)
  for batch in map(int, _BATCHES.value):
    for length in map(int, _LENGTHS.value):
      tokens = jax.device_put(rng.integers(0, model.config.vocab_size, (batch, length), np.int32))
      for entries in map(int, _GRACE.value):
        p = bench_arch.with_codebook(model, params, entries)
        call = lambda: lm.forward(model.config, p, tokens)[0].block_until_ready()
        rows.append({"batch": batch, "length": length, "grace_entries": entries,
                     **measure(call, batch * length)})
  return rows


def bench_generate(model, params):
  """Greedy `model.generate` of `--new_tokens` tokens (tokens/s counts new ones)."""
  rows, n = [], _NEW_TOKENS.value
  for batch in map(int, _BATCHES.value):
    prompts = ["The Eiffel Tower is located in the city of"] * batch
    call = lambda: model.generate(params, prompts, n, stop_at_eos=False, return_ids=True)
    length = lm.bucket(len(model.encode(prompts[0])))
    rows.append({"batch": batch, "length": length, "new_tokens": n, **measure(call, batch * n)})
  return rows


def bench_stats(model, params):
  """`stats.moments` (uncached) over `--stats_tokens` corpus tokens per call."""
  from keditjax import stats
  rows, layers = [], [int(l) for l in _STATS_LAYERS.value]
  for compute_dtype in _STATS_COMPUTE.value:
    call = lambda: stats.moments(model, layers, params=params, num_tokens=_STATS_TOKENS.value,
                                 compute_dtype=compute_dtype, cache_dir=False, progress=False)
    rows.append({"batch": stats.DEFAULT_BATCH_SIZE, "length": stats.DEFAULT_SEQ_LEN,
                 "layers": layers, "compute_dtype": compute_dtype,
                 "num_tokens": _STATS_TOKENS.value, **measure(call, _STATS_TOKENS.value)})
  return rows


_SCORE_CASES = flags.DEFINE_integer("score_cases", 128, "CounterFact cases per scoring call (score).")


def bench_score(model, params):
  """The harness's scoring pass (`evaluator.evaluate`, CounterFact + token +
  survey families: 6 teacher-forced rows per flattened CounterFact case) on
  `--score_cases` cases; tokens/s counts prompt + target tokens, and
  `records_per_s` cases per second."""
  from keditjax.evaluation import cases as cases_lib, evaluator
  cases = cases_lib.load_cases("counterfact", limit=_SCORE_CASES.value)
  families = ("counterfact", "token", "survey")
  ref = evaluator.reference(model, params, cases)
  pairs = [p for c in cases for p in evaluator._pairs(c, families)]  # pylint: disable=protected-access
  tokens = sum(len(model.encode(p)) + len(model.encode(" " + t.lstrip()))
               for _, _, p, t in pairs)
  rows = []
  for batch in map(int, _BATCHES.value):
    call = lambda: evaluator.evaluate(model, params, cases, ref, families,
                                      batch_size=batch)
    row = measure(call, tokens)
    row.update(batch=batch, cases=len(cases), rows=len(pairs),
               length="-", records_per_s=len(cases) / row["steady_s"])
    rows.append(row)
  return rows


TASKS = {"score": bench_score, "forward": bench_forward, "generate": bench_generate, "stats": bench_stats,
         "edit": lambda model, params: bench_edit.bench_edit(model, params, _compiles),
         "lifelong": lambda model, params: bench_edit.bench_lifelong(model, params, _compiles),
         "train": lambda model, params: bench_train.bench_train(_compiles),
         "arch": lambda model, params: bench_arch.bench_arch(
             model, params, measure, _NEW_TOKENS.value, list(map(int, _BATCHES.value)))}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep the output to results
  memory.tune_allocator()  # as every launcher does (experiments.common)
  # Off unless asked for: compile times are measured, not read from disk.
  cache_dir = compilation_cache.enable(flags.FLAGS.compilation_cache or "off")
  model = models.load(_MODEL.value)
  params = jax.device_put(model.params)  # move once, not on every call
  report = {"task": _TASK.value, "model": _MODEL.value,
            "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "num_devices": jax.device_count(), "jax": jax.__version__,
            "compilation_cache": cache_dir,
            # What "auto" compute dtypes (ROME/MEMIT v*) resolve to here.
            "auto_compute_dtype": precision.resolve("auto"),
            "allocator": memory.tuned(),
            "params": sum(x.size for x in jax.tree.leaves(params)), "steps": _STEPS.value,
            "results": TASKS[_TASK.value](model, params)}
  # The process's peak resident memory (Linux: KiB), model and compiles included.
  report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"{report['task']} {report['model']} ({report['params'] / 1e6:.1f}M params) on "
        f"{report['device']} x{report['num_devices']}, jax {report['jax']}")
  if _TASK.value in ("edit", "lifelong", "train", "arch"):
    for r in report["results"]:
      print(json.dumps(r))
  else:
    print_table(report)
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump(report, f, indent=1)


def print_table(report):
  print(f"{'batch':>5} {'len':>5} {'compile_s':>10} {'#comp':>5} {'steady_ms':>10} {'tok/s':>10}")
  for r in report["results"]:
    print(f"{r['batch']:>5} {r['length']:>5} {r['compile_s']:>10.2f} {r['compiles']:>5} "
          f"{r['steady_s'] * 1e3:>10.2f} {r['tokens_per_s']:>10.0f}" +
          (f"  {r['grace_entries']} GRACE entries" if r.get("grace_entries") else "") +
          (f"  {r['records_per_s']:.1f} records/s" if "records_per_s" in r else ""))


if __name__ == "__main__":
  app.run(main)
