r"""What continuous batching saves in MEMIT's batched v* loop (issue 19).

  python -m experiments.bench_memit --num_records=200 \
      --output_json=docs/benchmarks/memit_vstar_continuous.json

Optimises MEMIT's z (`compute.optimize_values` at the last edited layer,
the default `MemitHParams`) for the first `--num_records` CounterFact
records, chunk after chunk and with continuous batching (`v_continuous`),
each twice: `first_s` includes compilation, `steady_s` is the second call.
Reports the slot-steps run (request slots × loop steps) and jitted loop
calls, and how far the two modes' deltas differ (they should agree).
"""

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

from experiments import common
from keditjax import data, editors, models
from keditjax.editors import base, compute
from keditjax.models import precision, tiny

_N = flags.DEFINE_integer("num_records", 100, "CounterFact records (one MEMIT batch).")
_MODEL = flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model name for load(), "
                             "or 'tiny': a random tiny Llama (a smoke test).")
_CHUNK = flags.DEFINE_integer("chunk", None, "Slots per pool / requests per chunk "
                              "(default: MemitHParams.v_chunk).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Runs per mode: the first includes "
                                "compilation, the second is steady (1: only the first).")
_OUT = flags.DEFINE_string("output_json", None, "Where to write the results.")


def main(argv):
  del argv
  cache_dir = common.setup()
  hp = editors.hparams_class("memit")()
  model = (tiny.tiny_lm(max(hp.layers) + 2) if _MODEL.value == "tiny"
           else models.load(_MODEL.value))
  chunk = _CHUNK.value or hp.v_chunk
  layer = min(max(hp.layers), model.config.num_layers - 1)
  templates = compute.context_templates(model, model.params, hp.context_lengths,
                                        seed=hp.seed)
  requests = [base.make_requests(r)[0]
              for r in data.read_records("counterfact")[:_N.value]]
  report = {"task": "memit_vstar", "model": _MODEL.value,
            "command": "python -m experiments.bench_memit " + " ".join(sys.argv[1:]),
            "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "num_devices": jax.device_count(), "jax": jax.__version__,
            "compilation_cache": cache_dir,
            "auto_compute_dtype": precision.resolve("auto"),
            "num_records": len(requests), "chunk": chunk, "layer": layer,
            "templates": len(templates), "v_steps": hp.v_steps,
            "v_stop_loss": hp.v_stop_loss, "modes": {}}
  deltas = {}
  for name, continuous in (("chunked", False), ("continuous", True)):
    seconds = []
    for _ in range(max(1, _REPEATS.value)):
      start = time.perf_counter()
      out = compute.optimize_values(
          model, model.params, requests, templates, layer=layer,
          site_kind="resid", hp=hp.value_hparams(), chunk=chunk,
          continuous=continuous)
      seconds.append(time.perf_counter() - start)
    deltas[name] = out["delta"]
    report["modes"][name] = {
        "first_s": seconds[0], "steady_s": seconds[1] if len(seconds) > 1 else None,
        "segments": out["segments"], "slot_steps": out["slot_steps"],
        "chunked_slot_steps": out["chunked_slot_steps"],
        "request_passes": int(np.sum(out["steps"] + 1)),
        "steps_histogram": np.bincount(out["steps"]).tolist()}
    print(name, json.dumps(report["modes"][name]), flush=True)
  chunked, continuous = report["modes"]["chunked"], report["modes"]["continuous"]
  report["slot_steps_saved"] = 1 - continuous["slot_steps"] / chunked["slot_steps"]
  key = "steady_s" if chunked["steady_s"] else "first_s"
  report["speedup"] = {"of": key, "value": chunked[key] / continuous[key]}
  report["max_abs_delta_diff"] = float(np.abs(deltas["chunked"] -
                                              deltas["continuous"]).max())
  print(f"slot-steps saved {report['slot_steps_saved']:.1%}, speed-up ({key}) "
        f"{report['speedup']['value']:.2f}x, max |Δδ| {report['max_abs_delta_diff']:.2e}")
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)
