"""The batch-size curve's table and figure (experiments.batch_curve) and the
lifelong editing benchmark's turn bookkeeping (experiments.bench_edit)."""

import os

import pytest

from experiments import lifelong_render as lr


def _data():
  rows = []
  for method in ("memit", "alphaedit"):
    for i, b in enumerate((1, 10, 100)):
      rows.append({"method": method, "batch_size": b, "n": max(b, 10),
                   "batches": max(b, 10) // b, "first_for_method": i == 0,
                   "efficacy_score": 90.0 + i, "paraphrase_score": 80.25,
                   "neighborhood_score": 60.0 - i,
                   "seconds_per_edit": 3.0 / (i + 1)})
  return {"rows": rows, "skipped": []}


def test_batch_table_one_line_per_row_compiles_marked():
  lines = lr.batch_table(_data())
  assert lines[0] == "| " + " | ".join(lr.BATCH) + " |"
  assert len(lines) == 2 + 6
  assert lines[2] == ("| memit | 1 | 10 (10) | 90.0 | 80.2 | 60.0 | "
                      "3.00 (compiles) |")
  assert lines[4] == "| memit | 100 | 100 (1) | 92.0 | 80.2 | 58.0 | 1.00 |"


def test_batch_plot_writes_a_png(tmp_path):
  path = os.path.join(tmp_path, "curve.png")
  lr.batch_plot(_data(), path)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
