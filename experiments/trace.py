r"""Causal tracing (ROME §2) over known facts: heatmaps and numbers.

  python -m experiments.trace [--model=smollm2-135m] [--num_prompts=10]
      [--samples=10] [--window=10] [--noise=<3 x subject embedding std>]
      [--kinds=resid,mlp,attn] [--only_correct] [--output_dir=runs/trace]
      [--data_path=known_1000]   # a keditjax.data name, a path or hf:<id>

The answer is the model's greedy next token (`--only_correct` skips facts it
gets wrong, as ROME does). Writes `trace_<known_id>.png` (resid/MLP/attention
heatmaps, tokens x layers, subject tokens starred), `average.png` (average
indirect effect over ROME's six token groups) and `trace.json` (per-prompt
scores, low/high scores, averages, peak layers: the MLP's at the last subject
token is where ROME edits).
"""

import itertools
import json
import os
import time

from absl import app, flags

from experiments import common
from keditjax import data, models, progress
from keditjax.analysis import tracing

_MODEL = flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model to load.")
_DATA = flags.DEFINE_string(
    "data_path", "known_1000", "ROME's known_1000.json (a name, path or hf:<id>).")
_NUM = flags.DEFINE_integer("num_prompts", 10, "How many facts to trace.")
_SAMPLES = flags.DEFINE_integer("samples", 10, "Noise samples (ROME: 10).")
_WINDOW = flags.DEFINE_integer(
    "window", 10, "Layers restored per MLP/attention state (ROME: 10).")
_NOISE = flags.DEFINE_float(
    "noise", None, "Noise std (default: 3 x the subjects' embedding std).")
_SEED = flags.DEFINE_integer("seed", 1, "Noise seed.")
_KINDS = flags.DEFINE_list("kinds", list(tracing.KINDS), "States to restore.")
_ONLY_CORRECT = flags.DEFINE_bool(
    "only_correct", False, "Skip facts the model gets wrong (as ROME does).")
_OUTPUT = flags.DEFINE_string("output_dir", "runs/trace", "Output directory.")


def is_correct(answer, record):
  """Whether the greedy next token starts the known attribute."""
  return bool(answer.strip()) and record["attribute"].startswith(answer.strip())


def main(argv):
  del argv
  common.setup()  # quiet logs, persistent XLA cache
  records = data.read_records(_DATA.value)
  model = models.load(_MODEL.value)
  noise = _NOISE.value if _NOISE.value is not None else 3 * (  # as ROME
      tracing.embedding_std(model, [r["subject"] for r in records]))
  if _ONLY_CORRECT.value:
    records = (r for r in records
               if is_correct(model.generate(model.params, r["prompt"], 1), r))
  os.makedirs(_OUTPUT.value, exist_ok=True)
  traces, prompts, start = [], [], time.perf_counter()
  for record in progress.bar(itertools.islice(records, _NUM.value), desc="prompts",
                     total=_NUM.value):
    trace = tracing.causal_trace(
        model, record["prompt"], record["subject"], noise=noise,
        samples=_SAMPLES.value, window=_WINDOW.value, seed=_SEED.value,
        kinds=_KINDS.value, progress=True)
    tracing.plot_trace(trace, os.path.join(
        _OUTPUT.value, f"trace_{record['known_id']}.png"))
    traces.append(trace)
    prompts.append({"known_id": record["known_id"], "correct": is_correct(
        trace.answer, record), "attribute": record["attribute"],
                    **trace.to_json()})
    progress.write(f"{trace.prompt!r} -> {trace.answer!r} {prompts[-1]['correct']}"
               f" p clean {trace.high_score:.3f} corrupted {trace.low_score:.3f}")
  seconds = time.perf_counter() - start
  average = tracing.average_traces(traces)
  tracing.plot_average(average, os.path.join(_OUTPUT.value, "average.png"),
                       f"{model.name}: average indirect effect, "
                       f"{len(traces)} prompts")
  peaks = {kind: {group: tracing.peak_layers(average, kind, group)
                  for group in ("last subject token", "last token")}
           for kind in _KINDS.value}
  with open(os.path.join(_OUTPUT.value, "trace.json"), "w") as f:
    json.dump(tracing.to_json({
        "model": model.name, "noise": noise, "samples": _SAMPLES.value,
        "window": _WINDOW.value, "seed": _SEED.value, "seconds": seconds,
        "prompts": prompts, "average": average, "peak_layers": peaks}), f,
              allow_nan=False)
  print(f"\n{len(traces)} prompts "
        f"({sum(p['correct'] for p in prompts)} correct) in {seconds:.0f}s, "
        f"noise={noise:.4f}; mean clean p={average['high_score']:.3f}, "
        f"corrupted p={average['low_score']:.3f}; top-3 peak layers: {peaks}")


if __name__ == "__main__":
  app.run(main)
