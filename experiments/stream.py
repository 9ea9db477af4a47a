r"""Stream CounterFact facts into a live model while a reader asks it.

  python -m experiments.stream --method=ultraedit --num_facts=500 --rate=2 \
      --output_json=docs/results/stream_ultraedit_cf500.json

Facts arrive at `--rate` per second; each mode in `--modes` replays the same
facts from the unedited model: "batched" groups what arrives within
`--latency_budget_s` (at most `--max_batch`), "one_by_one" applies each alone.
Reports edit latency (arrival -> visible to readers), edits per second,
reader latency and accuracy over time (JSON + a PNG beside it).
"""

import json

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from experiments.configs import editors as editor_configs
from keditjax import editors, models
from keditjax.evaluation import cases as cases_lib
from keditjax.stream import live as live_lib, replay

flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model to edit.")
flags.DEFINE_enum("method", "ultraedit", list(editors.METHODS), "Editing method.")
flags.DEFINE_integer("num_facts", 500, "CounterFact facts to stream.")
flags.DEFINE_integer("num_unrelated", 8, "Unrelated prompts asked at every read.")
flags.DEFINE_float("rate", 2.0, "Arrivals per second.")
flags.DEFINE_list("modes", ["batched", "one_by_one"], "Replays to run.")
flags.DEFINE_integer("max_batch", 16, "Most requests per micro-batch.")
flags.DEFINE_float("latency_budget_s", 1.0, "Wait for a batch to fill.")
flags.DEFINE_float("read_period_s", 1.0, "Seconds between reads.")
flags.DEFINE_bool("manifest", False, "Keep an edit manifest while streaming (it grows by each "
                  "operation's declared deltas: docs/benchmarks/manifest_ultraedit_cf32.json).")
flags.DEFINE_string("output_json", "runs/stream.json", "Results JSON (a PNG beside it).")
config_flags.DEFINE_config_file("config", "experiments/configs/editors.py", "Editor hyper-parameters.")
FLAGS = flags.FLAGS


def rolling(values, window=10):  # the mean of the last `window` reads (one asks 8 facts: noisy)
  return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
          for i in range(len(values))]


def plot(results, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for mode, r in results.items():
    ok = [e for e in r["edits"] if "latency_s" in e]
    a.plot([e["arrival_s"] for e in ok], [e["latency_s"] for e in ok], ".", ms=3, label=mode)
    reads = [x for x in r["reads"] if "efficacy" in x]
    b.plot([x["time_s"] for x in reads], rolling([x["efficacy"] for x in reads]), "-", lw=1,
           label=f"{mode}: edited facts")
    other = [x for x in r["reads"] if "unrelated" in x]
    b.plot([x["time_s"] for x in other], rolling([x["unrelated"] for x in other]), ":", lw=1,
           label=f"{mode}: unrelated")
  a.set(xlabel="arrival (s)", ylabel="arrival -> visible (s)", title="edit latency")
  b.set(xlabel="time (s)", ylabel="reader accuracy", title="answers while editing (mean of 10 reads)", ylim=(-0.05, 1.05))
  a.legend()
  b.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  common.setup()
  if not FLAGS.modes or set(FLAGS.modes) - {"batched", "one_by_one"}:
    raise app.UsageError(f"--modes={FLAGS.modes}: use batched and/or one_by_one.")
  model = models.load(FLAGS.model)
  cases = cases_lib.load_cases("counterfact", limit=FLAGS.num_facts + FLAGS.num_unrelated)
  stream, held = cases[:FLAGS.num_facts], cases[FLAGS.num_facts:]
  unrelated = [(c.neighborhood[0][0], c.target_true, c.target_new) for c in held]
  editor = editors.get(FLAGS.method, editor_configs.hparams_from(FLAGS.config, FLAGS.method))
  out = {"command": "python -m experiments.stream " + " ".join(
      f"--{k}={getattr(FLAGS, k)}" for k in ("method", "num_facts", "rate", "max_batch",
                                             "latency_budget_s", "read_period_s")),
         "model": FLAGS.model, "unedited": replay.final_accuracy(model, model.params, stream),
         "modes": {}}
  results = {}
  for mode in FLAGS.modes:
    live = live_lib.LiveModel(model, editor, max_batch=FLAGS.max_batch if mode == "batched" else 1,
                              latency_budget_s=FLAGS.latency_budget_s, track_manifest=FLAGS.manifest)
    results[mode] = replay.replay(live, stream, rate_per_s=FLAGS.rate,
                                  read_period_s=FLAGS.read_period_s, unrelated=unrelated)
    summary = replay.summarize(results[mode])
    summary["final"] = replay.final_accuracy(model, live.params, stream)
    out["modes"][mode] = dict(summary=summary, **results[mode])
    print(mode, json.dumps(summary))
  with open(FLAGS.output_json, "w") as f:
    json.dump(out, f, indent=1)
  plot(results, FLAGS.output_json.rsplit(".", 1)[0] + ".png")
  print("wrote", FLAGS.output_json)


if __name__ == "__main__":
  app.run(main)
