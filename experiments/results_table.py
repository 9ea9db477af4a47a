r"""Collects `experiments.evaluate` runs into docs/RESULTS.md rows.

  python -m experiments.results_table --runs=runs/unedited_cf500,runs/rome_cf500 \
      --store=docs/results

Prints one markdown table per dataset (CounterFact, zsRE) with the headline
metrics, the wall time and the reproducing command. With --store, copies each
results.json (without the per-case rows) to STORE/<run name>.json. With
--plot=PNG, draws one metric against another (--axes=X,Y), a point per run.
"""

import json
import os

from absl import app, flags

from keditjax.evaluation import report

flags.DEFINE_list("runs", [], "Run directories (each with results.json).")
flags.DEFINE_string("store", None, "Copy compact results here.")
flags.DEFINE_string("plot", None, "Write a scatter of --axes here (PNG).")
flags.DEFINE_list("axes", ["locality_acc", "efficacy_score"], "X,Y metrics.")
FLAGS = flags.FLAGS

COLUMNS = {
    "counterfact": ("efficacy_score", "paraphrase_score", "neighborhood_score",
                    "efficacy_magnitude", "fluency", "rewrite_acc",
                    "rephrase_acc", "locality_acc", "sr", "gr", "dd", "rr"),
    "zsre": ("zsre_efficacy", "zsre_paraphrase", "zsre_specificity",
             "portability_acc", "locality_acc", "sr", "gr", "dd", "rr"),
}


def command(results: dict) -> str:
  c, p = results.get("command", {}), results["protocol"]
  parts = ["python -m experiments.evaluate", f"--method={results['method']}"
           if results["method"] != "unedited" else "--method=none",
           f"--dataset={c.get('dataset')}", f"--num_edits={c.get('num_edits')}"]
  checkpoint = (results.get("hparams") or {}).get("checkpoint")
  if checkpoint:
    parts.append(f"--config.{results['method']}.checkpoint={checkpoint}")
  if p["mode"] != "unedited":
    parts.append(f"--mode={p['mode']}")
    if p.get("batch_size", 1) != 1:
      parts.append(f"--batch_size={p['batch_size']}")
    if p.get("dd_every") not in (None, 10):
      parts.append(f"--dd_every={p['dd_every']}")
  # known_1000 is the default; runs made before that record "auto" (the
  # oldest record nothing, and their commands cannot say).
  if c.get("heldout", "known_1000") != "known_1000":
    parts.append(f"--heldout={c['heldout']}")
  if c.get("heldout_size", 100) != 100:
    parts.append(f"--heldout_size={c['heldout_size']}")
  return " ".join(parts)


def row(name: str, results: dict, columns) -> str:
  m = results["metrics"]
  cells = [f"{m[k]:.1f}" if m.get(k) is not None else "" for k in columns]
  p = results["protocol"]
  proto = p["mode"] if p["mode"] == "unedited" else (
      f"{p['mode']}" + (f" ×{p['batch_size']}" if p.get("batch_size", 1) > 1 else ""))
  minutes = results["timing"]["total_seconds"] / 60
  return (f"| {results['method']} | {proto} | {results['n']} | " +
          " | ".join(cells) + f" | {minutes:.1f} min | `{command(results)}` |")


def main(argv):
  del argv
  tables = {}
  for run in FLAGS.runs:
    with open(os.path.join(run, "results.json")) as f:
      results = json.load(f)
    dataset = results.get("command", {}).get("dataset", "counterfact")
    tables.setdefault(dataset, []).append((os.path.basename(run.rstrip("/")),
                                           results))
    if FLAGS.store:
      os.makedirs(FLAGS.store, exist_ok=True)
      compact = {k: v for k, v in results.items() if k != "cases"}
      with open(os.path.join(FLAGS.store, os.path.basename(run.rstrip("/")) +
                             ".json"), "w") as f:
        json.dump(compact, f, indent=1)
  for dataset, runs in tables.items():
    columns = COLUMNS.get(dataset, COLUMNS["counterfact"])
    print(f"\n### {dataset}\n")
    print("| method | protocol | n | " + " | ".join(columns) +
          " | time | command |")
    print("|" + "---|" * (len(columns) + 5))
    for name, results in runs:
      print(row(name, results, columns))
  if FLAGS.plot:
    report.scatter([r for runs in tables.values() for r in runs], FLAGS.plot,
                   *FLAGS.axes)


if __name__ == "__main__":
  app.run(main)
