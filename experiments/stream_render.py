"""Markdown tables of the stream and rollback experiments (issue 20).

  python -m experiments.stream_render docs/results/stream_ultraedit_cf500.json

No flags: tests/test_results_docs.py imports it to regenerate the tables in
docs/RESULTS.md from their JSONs.
"""

import json
import sys

STREAM = ["mode", "applied", "operations", "mean batch",
          "edit latency median (s)", "p90 (s)", "edits/s",
          "reader latency median (s)", "efficacy", "neighbourhood"]
ROLLBACK = ["mode", "P(new) before its edit", "edited", "after rollback",
            "gap (points)", "others still succeeding"]


def _row(cells):
  return "| " + " | ".join(cells) + " |"


def _head(header):
  return [_row(header), _row(["---"] * len(header))]


def stream_table(data) -> list:
  """One row for the unedited model, one per replay mode."""
  lines = _head(STREAM)
  u = data["unedited"]
  lines.append(_row(["unedited", "", "", "", "", "", "", "",
                     f"{u['efficacy']:.1f}", f"{u['neighbourhood']:.1f}"]))
  for mode, r in data["modes"].items():
    s = r["summary"]
    lines.append(_row([
        mode, str(s["applied"]), str(s["operations"]),
        f"{s['mean_batch']:.2f}", f"{s['edit_latency_s']['median']:.1f}",
        f"{s['edit_latency_s']['p90']:.1f}", f"{s['edits_per_s']:.3f}",
        f"{s['reader_latency_s']['median']:.2f}",
        f"{s['final']['efficacy']:.1f}", f"{s['final']['neighbourhood']:.1f}"]))
  return lines


def rollback_table(data) -> list:
  """One row per rollback mode (P(new) in points, 0-100)."""
  lines = _head(ROLLBACK)
  for mode, r in data["modes"].items():
    p = r["rolled_back_p_new"]
    lines.append(_row([
        mode, f"{p['pre_edit']:.2f}", f"{p['edited']:.2f}", f"{p['after']:.2f}",
        f"{p['gap_points']:+.2f}",
        f"{r['others_success_held']:.1f}% of {r['others_succeeding_before']}"]))
  return lines


if __name__ == "__main__":
  for path in sys.argv[1:]:
    with open(path) as f:
      data = json.load(f)
    make = rollback_table if "rolled_back" in data else stream_table
    print("\n".join(make(data)))
