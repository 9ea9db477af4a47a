r"""Causal tracing (ROME §2) over known facts: heatmaps and numbers.

  python -m experiments.trace [--model=smollm2-135m] [--num_prompts=10]
      [--samples=10] [--window=10] [--noise=<3 x subject embedding std>]
      [--data_path=../shared/data/known_1000/known_1000.json]
      [--output_dir=runs/trace]

For each of the first `num_prompts` known facts, the answer is the model's own
greedy next token. Writes `trace_<known_id>.png` (residual / MLP / attention
heatmaps, tokens x layers, subject tokens starred), `average.png` (the average
indirect effect over ROME's six token groups) and `trace.json` (per-prompt
scores, low/high scores, averages, the MLP peak layers at the last subject
token: where ROME edits).
"""

import json
import os
import time

from absl import app, flags, logging
import numpy as np
from tqdm import tqdm

from keditjax import models
from keditjax.analysis import tracing

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODEL = flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model to load.")
_DATA = flags.DEFINE_string(
    "data_path", os.path.join(_REPO, "..", "shared", "data", "known_1000",
                              "known_1000.json"), "ROME's known_1000.json.")
_NUM = flags.DEFINE_integer("num_prompts", 10, "Trace the first N facts.")
_SAMPLES = flags.DEFINE_integer("samples", 10, "Noise samples (ROME: 10).")
_WINDOW = flags.DEFINE_integer(
    "window", 10, "Layers restored per MLP/attention state (ROME: 10).")
_NOISE = flags.DEFINE_float(
    "noise", None, "Noise std (default: 3 x the subjects' embedding std).")
_SEED = flags.DEFINE_integer("seed", 1, "Noise seed.")
_OUTPUT = flags.DEFINE_string("output_dir", "runs/trace", "Output directory.")


def peak_layers(average, kind, group, top=3):
  """The `top` layers with the largest average indirect effect in `group`."""
  effect = np.nan_to_num(average[kind]["effect"][tracing.GROUPS.index(group)],
                         nan=-np.inf)
  return [int(l) for l in np.argsort(-effect)[:top]]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep the output to results
  with open(_DATA.value) as f:
    records = json.load(f)[:_NUM.value]
  model = models.load(_MODEL.value)
  noise = _NOISE.value
  if noise is None:  # ROME: over all known facts' subjects
    with open(_DATA.value) as f:
      noise = 3 * tracing.embedding_std(model, [r["subject"] for r in json.load(f)])
  os.makedirs(_OUTPUT.value, exist_ok=True)
  traces, prompts, start = [], [], time.perf_counter()
  for record in tqdm(records, desc="prompts"):
    trace = tracing.causal_trace(
        model, record["prompt"], record["subject"], noise=noise,
        samples=_SAMPLES.value, window=_WINDOW.value, seed=_SEED.value,
        progress=True)
    tracing.plot_trace(trace, os.path.join(
        _OUTPUT.value, f"trace_{record['known_id']}.png"))
    answer = trace.answer.strip()
    correct = bool(answer) and record["attribute"].startswith(answer)
    traces.append(trace)
    prompts.append({"known_id": record["known_id"],
                    "attribute": record["attribute"], "correct": correct,
                    **trace.to_json()})
    tqdm.write(f"{record['prompt']!r} -> {trace.answer!r} (correct={correct}) "
               f"clean p={trace.high_score:.3f} corrupted p={trace.low_score:.3f}")
  seconds = time.perf_counter() - start
  average = tracing.average_traces(traces)
  tracing.plot_average(average, os.path.join(_OUTPUT.value, "average.png"),
                       f"{model.name}: average indirect effect, "
                       f"{len(traces)} prompts")
  peaks = {kind: {group: peak_layers(average, kind, group)
                  for group in ("last subject token", "last token")}
           for kind in tracing.KINDS}
  correct = [t for t, p in zip(traces, prompts) if p["correct"]]
  result = {"model": model.name, "noise": noise, "samples": _SAMPLES.value,
            "window": _WINDOW.value, "seed": _SEED.value, "seconds": seconds,
            "prompts": prompts, "average": average, "peak_layers": peaks,
            "average_correct": tracing.average_traces(correct) if correct else None}
  with open(os.path.join(_OUTPUT.value, "trace.json"), "w") as f:
    json.dump(tracing.to_json(result), f, allow_nan=False)
  print(f"\n{len(traces)} prompts ({len(correct)} correct) in {seconds:.0f}s, "
        f"noise={noise:.4f}; average clean p={average['high_score']:.3f}, "
        f"corrupted p={average['low_score']:.3f}")
  for kind, by_group in peaks.items():
    print(f"{kind}: peak layers " + "; ".join(
        f"{group}: {layers}" for group, layers in by_group.items()))


if __name__ == "__main__":
  app.run(main)
