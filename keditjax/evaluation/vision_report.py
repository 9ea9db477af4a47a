"""Writes vision-editing results: results.json, summary.md and PNG plots.

  paths = write(results, "runs/ftl")                 # one method
  paths = write_comparison({"ft": r1, "ftl": r2}, "runs/all")

In sequential runs `metrics.png` plots RR and DD against the number of
successive edits; `compare.png` does the same for several methods on one
figure (the survey's "DD and RR against the number of successive edits").
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from keditjax.evaluation import report

COLUMNS = (("sr", "SR"), ("sr_at_edit", "SR at edit"), ("gr", "GR"),
           ("dd", "DD"), ("rr", "RR"), ("test_accuracy_before", "Acc. before"),
           ("test_accuracy_after", "Acc. after"))
NOTE = ("SR, GR, RR and accuracies in %; DD in points of test accuracy "
        "(test split minus the edited images). See docs/metrics.md, "
        "\"Vision editing\".")


def _fmt(value, digits: int = 1) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:.{digits}f}"


def _table(rows: dict) -> list[str]:
  """A markdown table: one row per name -> metrics dict."""
  cols = [(k, label) for k, label in COLUMNS
          if any(k in m for m in rows.values())]
  lines = ["| method | " + " | ".join(label for _, label in cols) + " |",
           "|---|" + "---|" * len(cols)]
  for name, m in rows.items():
    # DD to 0.01 points: one test image of 1,000 is 0.1.
    lines.append(f"| {name} | " + " | ".join(
        _fmt(m.get(k), 2 if k == "dd" else 1) for k, _ in cols) + " |")
  return lines


def summary_markdown(results: dict, title: str = "") -> str:
  """The headline metrics, the protocol, timing and the step records."""
  p = results["protocol"]
  lines = [f"# {title or results['method']}", "",
           f"- method: `{results['method']}`; edits: {results['n']} "
           f"({p.get('edits', '?')})",
           f"- protocol: mode `{p['mode']}`, successive {p['successive']}, "
           f"evaluated {p['evaluated']}", f"- DD set: {p['dd_set']}", ""]
  lines += _table({results["method"]: results["metrics"]}) + ["", NOTE]
  timing = results.get("timing", {})
  lines.append("\nTiming: " + ", ".join(
      f"{k} {v:.2f}" for k, v in sorted(timing.items())))
  if results.get("steps"):
    lines += ["", "| edits | SR at edit (so far) | SR | RR | DD | test acc. |",
              "|---|---|---|---|---|---|"]
    for s in results["steps"]:
      lines.append(f"| {s['edits']} | {_fmt(s.get('sr_at_edit_so_far'))} | "
                   f"{_fmt(s.get('sr'))} | {_fmt(s.get('rr'))} | "
                   f"{_fmt(s.get('dd'))} | {_fmt(s.get('test_accuracy'))} |")
  return "\n".join(lines) + "\n"


def _curves(steps, key):
  steps = [s for s in steps if key in s]
  return ([s["edits"] for s in steps],
          [np.nan if s[key] is None else s[key] for s in steps])


def plot(results_by_method: dict, path: str, title: str = "") -> str | None:
  """Sequential runs: RR (left) and DD (right) against the number of edits,
  one line per method. Single-mode runs: grouped bars of SR, GR and DD.
  Returns the path written (None when there is nothing to plot)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sequential = {m: r for m, r in results_by_method.items() if r.get("steps")}
  if sequential:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, r in sequential.items():
      ax1.plot(*_curves(r["steps"], "rr"), marker=".", label=f"{method} RR")
      ax2.plot(*_curves(r["steps"], "dd"), marker=".", label=method)
    if len(sequential) == 1:
      ax1.plot(*_curves(next(iter(sequential.values()))["steps"],
                        "sr_at_edit_so_far"), marker=".", ls="--",
               label="SR at edit (running mean)")
    ax1.set(xlabel="successive edits", ylabel="%", ylim=(-2, 102),
            title="retain rate RR")
    ax2.axhline(0, color="gray", lw=0.5)
    ax2.set(xlabel="successive edits", ylabel="points",
            title="drawdown DD (test accuracy lost)")
    ax1.legend()
    ax2.legend()
  else:
    keys = ("sr", "gr", "dd")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    width = 0.8 / max(1, len(results_by_method))
    for j, (method, r) in enumerate(results_by_method.items()):
      ax.bar(np.arange(len(keys)) + j * width,
             [r["metrics"].get(k) or 0.0 for k in keys], width, label=method)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2,
                  ["SR (%)", "GR (%)", "DD (points)"])
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _write_json(results: dict, path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(report._plain(results), f, indent=1)  # pylint: disable=protected-access
  os.replace(tmp, path)


def write(results: dict, output_dir: str, title: str = "") -> dict:
  """Writes results.json, summary.md and metrics.png into `output_dir`."""
  os.makedirs(output_dir, exist_ok=True)
  paths = {"results": os.path.join(output_dir, "results.json"),
           "summary": os.path.join(output_dir, "summary.md")}
  _write_json(results, paths["results"])
  with open(paths["summary"], "w") as f:
    f.write(summary_markdown(results, title))
  png = plot({results["method"]: results},
             os.path.join(output_dir, "metrics.png"), title)
  if png:
    paths["plot"] = png
  return paths


def write_comparison(results_by_method: dict, output_dir: str,
                     title: str = "") -> dict:
  """Each method's files under `output_dir/<method>/`, plus a joint
  results.json ({"protocol", "n", "methods": {method: {"metrics", "steps",
  "timing", "hparams"}}}), summary.md and compare.png (RR and DD against
  edits, all methods)."""
  os.makedirs(output_dir, exist_ok=True)
  for method, results in results_by_method.items():
    write(results, os.path.join(output_dir, method), f"{title} {method}")
  first = next(iter(results_by_method.values()))
  p = first["protocol"]
  lines = [f"# {title or 'vision editing'}", "",
           f"- edits: {first['n']} ({p.get('edits', '?')}); mode "
           f"`{p['mode']}`; DD set: {p['dd_set']}", ""]
  lines += _table({m: r["metrics"] for m, r in results_by_method.items()})
  lines += ["", NOTE, "", "Per-method files: " + ", ".join(
      f"`{m}/`" for m in results_by_method)]
  paths = {"results": os.path.join(output_dir, "results.json"),
           "summary": os.path.join(output_dir, "summary.md")}
  _write_json({"protocol": p, "n": first["n"], "methods": {
      m: {k: r.get(k) for k in ("metrics", "steps", "timing", "hparams")}
      for m, r in results_by_method.items()}}, paths["results"])
  with open(paths["summary"], "w") as f:
    f.write("\n".join(lines) + "\n")
  png = plot(results_by_method, os.path.join(output_dir, "compare.png"), title)
  if png:
    paths["plot"] = png
  return paths
