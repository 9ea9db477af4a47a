"""The batch-size curve's table and figure (experiments.batch_curve) and the
lifelong editing benchmark's turn bookkeeping (experiments.bench_edit)."""

import os

import jax
import numpy as np
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


def test_lifelong_turns_times_each_turn_and_carries_the_state():
  from experiments import bench_turns  # pylint: disable=import-outside-toplevel
  from keditjax import editors  # pylint: disable=import-outside-toplevel
  from keditjax.models import tiny  # pylint: disable=import-outside-toplevel
  model = tiny.tiny_lm(embed_std=1.0)
  records = [{"prompt": "{} lives in", "subject": f"Name{i}",
              "target_new": f" city{i}"} for i in range(4)]
  editor = editors.get("ultraedit", layers=(2, 3), lr=0.5)
  compiles = []
  row, new_params, new_state = bench_turns.lifelong_turns(
      editor, model, model.params, records, 2, compiles)
  assert row["method"] == "ultraedit" and row["num_edits"] == 4
  assert [t["edits"] for t in row["turns"]] == [2, 4]
  assert row["edit_s_total"] == pytest.approx(
      sum(t["s"] for t in row["turns"]))
  assert row["steady_s_per_turn"] == row["turns"][1]["s"]
  # The same edits applied by hand, turn by turn, give the same params.
  params, state = model.params, editor.init(model, model.params)
  for i in (0, 2):
    params, state, _ = editor.apply(model, params, records[i:i + 2], state)
  for a, b in zip(jax.tree.leaves((params, state)),
                  jax.tree.leaves((new_params, new_state))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert int(new_state.edits) == 2  # two turns: the state was carried
  with pytest.raises(ValueError, match="multiple"):
    bench_turns.lifelong_turns(editor, model, model.params, records[:3], 2,
                              compiles)
