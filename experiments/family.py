r"""The architectural family side by side (issue 17): quality from the
sequential acceptance runs, cost from the inference benchmark.

  python -m experiments.family --output=docs/results/family.json

Reads (missing files are reported as "not run", never invented):
  quality  docs/results/<run>.json written by `experiments.evaluate`
           (`RUNS` below: the command each came from is in its "command").
  cost     docs/results/arch_<method>_cpu.json written by
           `python -m experiments.benchmark --task=arch --arch_method=<m>`
           (generate latency, batch 1 and 8, prompt 32, 32 new tokens, vs
           0/10/100/1000 edits; added parameters; the process's peak RSS).

Writes the JSON table, a Markdown table on stdout, and two plots beside the
JSON: `family_quality.png` (efficacy / generalisation / locality per method
and dataset) and `family_latency.png` (ms per generated token vs #edits).

1,000-edit quality rows are not run on this 2-core CPU; the table gives the
time a 1,000-edit sequential run would take, estimated from each 100-edit
run's median edit time and its scoring rate (`estimate_1000`).
"""

import json
import os

from absl import app, flags

flags.DEFINE_string("results_dir", "docs/results", "Where the JSONs are.")
flags.DEFINE_string("output", "docs/results/family.json", "JSON output.")
FLAGS = flags.FLAGS

ARCH = ("grace", "tpatcher", "wise", "serac")
# (method, family, dataset, run file, note)
RUNS = (
    ("grace", "architectural", "counterfact", "grace_seq100.json", ""),
    ("tpatcher", "architectural", "counterfact", "tpatcher_cf_seq100.json", ""),
    ("wise", "architectural", "counterfact", "wise_cf_seq100.json", ""),
    ("serac", "architectural", "counterfact", "serac_cf_seq100.json", ""),
    ("rome", "direct", "counterfact", "rome_seq100.json", ""),
    ("memit", "direct", "counterfact", "memit_seq100_b10.json",
     "10 successive batches of 10"),
    ("alphaedit", "direct", "counterfact", "alphaedit_seq100_b10.json",
     "10 successive batches of 10"),
    ("grace", "architectural", "zsre", "grace_zsre_seq100.json", ""),
    ("tpatcher", "architectural", "zsre", "tpatcher_zsre_seq100.json", ""),
    ("wise", "architectural", "zsre", "wise_zsre_seq100.json", ""),
    ("serac", "architectural", "zsre", "serac_zsre_seq100.json", ""),
)
# What each dataset's three columns are (docs/metrics.md).
COLUMNS = {
    "counterfact": ("efficacy_score", "paraphrase_score",
                    "neighborhood_score"),
    "zsre": ("zsre_efficacy", "zsre_paraphrase", "locality_acc"),
}
# The edited model's extra modules after the run: the step extras to read.
SIZE_EXTRAS = ("codebook_size", "patch_neurons", "shards", "memory_size")


def quality_row(path, method, family, dataset, note):
  row = {"method": method, "family": family, "dataset": dataset,
         "file": os.path.basename(path), "note": note}
  if not os.path.exists(path):
    row["status"] = "not run"
    return row
  with open(path) as f:
    run = json.load(f)
  m = run["metrics"]
  eff, gen, loc = COLUMNS[dataset]
  last = run["steps"][-1] if run.get("steps") else {}
  timing = run["timing"]
  edits = run["n"]
  per_case_score = (timing["score_seconds"] + timing.get("retain_seconds", 0)
                    ) / max(edits, 1)
  row.update(
      status="measured", edits=edits,
      mode=run["protocol"]["mode"], batch_size=run["protocol"]["batch_size"],
      reliability=m[eff], generalisation=m[gen], locality=m[loc],
      columns=[eff, gen, loc], rr=m.get("rr"), dd=m.get("dd"),
      fluency=m.get("fluency"),
      modules={k: v for k, v in last.get("extras", {}).items()
               if k in SIZE_EXTRAS},
      edit_seconds_median=timing["edit_seconds_median"],
      total_seconds=timing["total_seconds"],
      # A 1,000-edit run: 1,000 edits at the median rate (per call of
      # `batch_size` cases) plus scoring 10x the cases.
      estimate_1000_hours=(
          1000 / run["protocol"]["batch_size"] * timing["edit_seconds_median"]
          + 1000 * per_case_score) / 3600)
  return row


def cost_rows(results_dir):
  out = {}
  for method in ARCH:
    path = os.path.join(results_dir, f"arch_{method}_cpu.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      report = json.load(f)
    out[method] = {
        "file": os.path.basename(path), "device": report["device"],
        "peak_rss_mib": report.get("peak_rss_mib"),
        "rows": [{k: r[k] for k in ("edits", "batch", "scope", "steady_s",
                                     "ms_per_token", "compile_s",
                                     "added_params")}
                 for r in report["results"]]}
  return out


def plot(table, costs, directory):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = [r for r in table if r["status"] == "measured"]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
  for ax, dataset in zip(axes[0], ("counterfact", "zsre")):
    sub = [r for r in rows if r["dataset"] == dataset]
    for i, key in enumerate(("reliability", "generalisation", "locality")):
      ax.bar([j + 0.27 * (i - 1) for j in range(len(sub))],
             [r[key] for r in sub], width=0.27, label=key)
    ax.set_xticks(range(len(sub)), [r["method"] for r in sub])
    ax.set_ylim(0, 105)
    ax.set_title(f"{dataset}: 100 sequential edits")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(directory, "family_quality.png"), dpi=110)
  plt.close(fig)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
  for ax, batch in zip(axes[0], (1, 8)):
    for method, cost in costs.items():
      pts = sorted((r["edits"], r["ms_per_token"]) for r in cost["rows"]
                   if r["batch"] == batch and r["scope"] == "out")
      ax.plot([max(e, 1) for e, _ in pts], [v for _, v in pts], "o-",
              label=method)
    ax.set_xscale("log")
    ax.set_xlabel("edits (0 plotted at 1)")
    ax.set_ylabel("ms per generated token")
    ax.set_title(f"generate, batch {batch}, prompt 32, 32 new tokens")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(directory, "family_latency.png"), dpi=110)
  plt.close(fig)


def markdown(table, costs):
  lines = ["| method | dataset | rel. | gen. | loc. | RR | DD | modules "
           "after 100 | median edit s | 1,000 edits (est. h) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in table:
    if r["status"] != "measured":
      lines.append(f"| {r['method']} | {r['dataset']} | not run |||||||| ")
      continue
    mods = ", ".join(f"{k} {v}" for k, v in r["modules"].items()) or "-"
    dd = "-" if r["dd"] is None else f"{r['dd']:.1f}"
    rr = "-" if r["rr"] is None else f"{r['rr']:.1f}"
    lines.append(
        f"| {r['method']} | {r['dataset']} | {r['reliability']:.1f} | "
        f"{r['generalisation']:.1f} | {r['locality']:.1f} | {rr} | {dd} | "
        f"{mods} | {r['edit_seconds_median']:.2f} | "
        f"{r['estimate_1000_hours']:.2f} |")
  lines += ["", "| method | edits | added params | b1 ms/token | "
            "b8 ms/token | peak RSS MiB |", "|---|---|---|---|---|---|"]
  for method, cost in costs.items():
    by = {}
    for r in cost["rows"]:
      if r["scope"] == "out":
        by.setdefault(r["edits"], {})[r["batch"]] = r
    for edits, b in sorted(by.items()):
      one, eight = b.get(1), b.get(8)
      lines.append(
          f"| {method} | {edits} | {(one or eight)['added_params']} | "
          f"{one['ms_per_token']:.2f} | {eight['ms_per_token']:.2f} | "
          f"{cost['peak_rss_mib']:.0f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  table = [quality_row(os.path.join(FLAGS.results_dir, f), m, fam, d, note)
           for m, fam, d, f, note in RUNS]
  costs = cost_rows(FLAGS.results_dir)
  report = {"quality": table, "cost": costs}
  with open(FLAGS.output, "w") as f:
    json.dump(report, f, indent=1)
  plot(table, costs, os.path.dirname(os.path.abspath(FLAGS.output)))
  print(markdown(table, costs))


if __name__ == "__main__":
  app.run(main)
