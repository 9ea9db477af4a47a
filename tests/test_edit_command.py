"""The README's main job: `experiments.edit` on the real default model."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_edit_command_rewrites_the_fact_and_saves(tmp_path):
  out = tmp_path / "edit.json"
  saved = tmp_path / "edited"
  # Identity covariance and few context templates keep the test short; the
  # full configuration is what the README runs.
  cmd = [sys.executable, "-m", "experiments.edit", "--method=rome",
         "--config.rome.use_covariance=False",
         "--config.rome.context_lengths=((5, 3),)",
         f"--output_json={out}", f"--save={saved}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "after rome" in proc.stdout
  result = json.loads(out.read_text())
  for key in ("p_new_before", "p_new_after", "p_true_before", "p_true_after",
              "edit_seconds", "generations"):
    assert key in result
  assert result["p_new_after"] > 0.5 > result["p_new_before"]
  assert result["p_true_after"] < result["p_true_before"]
  assert set(result["generations"]) == {"prompt", "paraphrase", "unrelated"}
  # The unrelated prompt keeps its answer distribution (locality).
  before = result["before"]["unrelated"]["p_true"]
  after = result["after"]["unrelated"]["p_true"]
  assert abs(np.log(after) - np.log(before)) < 0.5
  # The saved model is the edited one.
  from keditjax import models
  edited = models.load(f"hf:{saved}")
  p = float(np.exp(edited.score(edited.params,
                                ["The mother tongue of Danielle Darrieux is"],
                                [" English"])[0]))
  np.testing.assert_allclose(p, result["p_new_after"], rtol=1e-3)
