"""Writes a run's results: `results.json`, `summary.md` and PNG plots."""

from __future__ import annotations

import json
import math
import os

import numpy as np

# (key, label) in the order tables show them; only keys present are shown.
COLUMNS = (
    ("efficacy_score", "Efficacy"), ("paraphrase_score", "Paraphrase"),
    ("neighborhood_score", "Neighbourhood"),
    ("efficacy_score_sum", "Eff. (sum)"), ("paraphrase_score_sum", "Para. (sum)"),
    ("neighborhood_score_sum", "Neigh. (sum)"),
    ("efficacy_magnitude", "EM"), ("paraphrase_magnitude", "PM"),
    ("neighborhood_magnitude", "NM"), ("fluency", "Fluency"),
    ("consistency", "Consistency"), ("rewrite_acc", "Rewrite acc"),
    ("rephrase_acc", "Rephrase acc"), ("locality_acc", "Locality acc"),
    ("portability_acc", "Portability acc"), ("zsre_efficacy", "zsRE eff."),
    ("zsre_paraphrase", "zsRE para."), ("zsre_specificity", "zsRE spec."),
    ("sr", "SR"), ("gr", "GR"), ("dd", "DD"),
    ("dd_ceiling", "DD ceiling"), ("rr", "RR"),
)


def _plain(x):
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, (np.generic,)):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None  # strict JSON has no NaN
  return x


def summary_markdown(results: dict, title: str = "") -> str:
  """A readable table of the aggregate metrics, the protocol and timing."""
  m = results["metrics"]
  cols = [(k, label) for k, label in COLUMNS if m.get(k) is not None]
  p = results["protocol"]
  lines = [f"# {title or results.get('method', '')}", "",
           f"- method: `{results.get('method')}`; cases: {results['n']}",
           f"- protocol: mode `{p['mode']}`, edit type {p.get('edit_type')}, "
           f"successive {p.get('successive')}, evaluated {p.get('evaluated')}",
           ""]
  lines += ["| " + " | ".join(label for _, label in cols) + " |",
            "|" + "---|" * len(cols),
            "| " + " | ".join(f"{m[k]:.1f}" for k, _ in cols) + " |", ""]
  lines.append("Scores, accuracies, SR/GR/RR in %; magnitudes in probability "
               "points; DD in points of held-out exact-match accuracy; "
               "fluency is ROME's n-gram entropy x100. See docs/metrics.md.")
  if results.get("heldout"):
    h = results["heldout"]
    lines.append(f"\nHeld-out set: {h['n']} facts, accuracy before editing "
                 f"{h['accuracy_before']:.1f}% (token accuracy "
                 f"{h['token_accuracy_before']:.1f}%).")
  t = results.get("timing", {})
  lines.append("\nTiming: " + ", ".join(
      f"{k} {v:.2f}" for k, v in sorted(t.items()) if isinstance(v, float)))
  if results.get("steps"):
    lines += ["", "| step | edits | SR at edit | SR | RR | DD |", "|---|---|---|---|---|---|"]
    for s in results["steps"]:
      def f(k):
        v = s.get(k)
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"
      lines.append(f"| {s['step']} | {s['edits']} | {f('sr_at_edit')} | "
                   f"{f('sr')} | {f('rr')} | {f('dd')} |")
  return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> str | None:
  """PNG plot: successive runs get SR/RR/DD against the number of edits;
  others a bar chart of the headline metrics. Returns the path written."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  steps = [s for s in results.get("steps", []) if "rr" in s]
  if steps:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [s["edits"] for s in steps]
    for key, label in (("sr_at_edit_so_far", "SR at edit (running mean)"),
                       ("sr", "SR of all edits so far, now"), ("rr", "RR")):
      ax1.plot(x, [np.nan if s.get(key) is None else s[key] for s in steps],
               marker=".", label=label)
    ax1.set(xlabel="edits", ylabel="%", ylim=(-2, 102),
            title=f"{results.get('method')}: success and retention")
    ax1.legend()
    if any("dd" in s for s in steps):
      ax2.plot(x, [s.get("dd", np.nan) for s in steps], marker=".", color="C3",
               label="DD (exact match)")
      ax2.plot(x, [s.get("dd_token_acc", np.nan) for s in steps], marker=".",
               color="C4", label="DD (token acc.)")
      ax2.axhline(0, color="gray", lw=0.5)
      ax2.set(xlabel="edits", ylabel="points", title="drawdown on held-out facts")
      ax2.legend()
  else:
    m = results["metrics"]
    keys = [(k, l) for k, l in COLUMNS if m.get(k) is not None and
            not k.endswith("magnitude") and k not in ("fluency", "dd")]
    if not keys:
      return None
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(keys)), 3.8))
    ax.bar(range(len(keys)), [m[k] for k, _ in keys])
    ax.set_xticks(range(len(keys)), [l for _, l in keys], rotation=45,
                  ha="right")
    ax.set(ylabel="%", ylim=(0, 100),
           title=f"{results.get('method')} ({results['protocol']['mode']}, "
                 f"n={results['n']})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def scatter(runs, path: str, x: str, y: str) -> list[str]:
  """PNG: metric `y` against metric `x`, one labelled point per `(name,
  results)` of `runs`. Returns the names drawn (runs without both metrics
  are left out)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = dict(COLUMNS)
  fig, ax = plt.subplots(figsize=(5.5, 4))
  drawn = []
  for name, results in runs:
    m = results["metrics"]
    if m.get(x) is not None and m.get(y) is not None:
      drawn.append(name)
      ax.scatter(m[x], m[y])
      ax.annotate(name, (m[x], m[y]), fontsize=7,  # alternate: less overlap
                  xytext=(3, 3 if len(drawn) % 2 else -10),
                  textcoords="offset points")
  ax.set(xlabel=labels.get(x, x), ylabel=labels.get(y, y))
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return drawn


def write(results: dict, output_dir: str, title: str = "") -> dict:
  """Writes results.json, summary.md and metrics.png into `output_dir`."""
  os.makedirs(output_dir, exist_ok=True)
  paths = {"results": os.path.join(output_dir, "results.json"),
           "summary": os.path.join(output_dir, "summary.md")}
  tmp = paths["results"] + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_plain(results), f, indent=1)
  os.replace(tmp, paths["results"])
  with open(paths["summary"], "w") as f:
    f.write(summary_markdown(results, title))
  png = plot(results, os.path.join(output_dir, "metrics.png"))
  if png:
    paths["plot"] = png
  return paths
