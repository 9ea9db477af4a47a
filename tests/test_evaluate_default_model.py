"""The harness on the real default model: scores equal a straightforward
unbatched computation, and `experiments.evaluate` writes what it promises."""

import json
import os
import subprocess
import sys

import numpy as np

from keditjax.evaluation import cases as C
from keditjax.evaluation import evaluator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mean_logprob(model, prompt, target):
  """log p(target | prompt) per token from one unpadded forward pass (numpy)."""
  p = model.encode(prompt)
  t = model.encode(target if target.startswith(" ") else " " + target)
  logits = np.asarray(model.apply(model.params, np.array([p + t])),
                      np.float64)[0]
  shift = logits.max(-1, keepdims=True)
  logp = logits - shift - np.log(np.exp(logits - shift).sum(-1, keepdims=True))
  return float(np.mean([logp[len(p) - 1 + i, tok] for i, tok in enumerate(t)]))


def test_unedited_counterfact_scores_equal_unbatched_reference(smollm2):
  cases = C.load_cases("counterfact", limit=20)
  per_case, summary = evaluator.evaluate(smollm2, smollm2.params, cases,
                                         families=("counterfact",))
  expected = {"efficacy": [], "paraphrase": [], "neighborhood": []}
  for case, m in zip(cases, per_case):
    new, true = case.target_new, case.target_true
    rows = {"efficacy": (case.prompt, new, true),
            "paraphrase": (case.paraphrase_prompts[0], new, true),
            "neighborhood": (case.neighborhood[0][0], case.neighborhood[0][1], new)}
    for name, (prompt, wanted, other) in rows.items():
      margin = (_mean_logprob(smollm2, prompt, wanted) -
                _mean_logprob(smollm2, prompt, other))
      np.testing.assert_allclose(m[f"{name}_margin"], margin, atol=2e-3)
      expected[name].append(margin > 0)
  for name, passes in expected.items():
    assert summary[f"{name}_score"] == 100.0 * np.mean(passes)
  # The unedited model rarely prefers the counterfactual; it keeps neighbours.
  assert summary["efficacy_score"] < 50 and summary["paraphrase_score"] < 50
  assert summary["neighborhood_score"] > 50


def test_evaluate_command_sequential_rome(tmp_path):
  out = tmp_path / "run"
  cmd = [sys.executable, "-m", "experiments.evaluate", "--method=rome",
         "--dataset=counterfact", "--num_edits=3", "--mode=sequential",
         "--heldout_size=8", "--fluency_tokens=8",
         "--config.rome.use_covariance=False",
         "--config.rome.context_lengths=((5, 3),)", f"--output_dir={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert set(results) >= {"protocol", "n", "metrics", "cases", "steps"}
  assert results["n"] == 3 and len(results["cases"]) == 3
  assert results["protocol"]["successive"] and results["protocol"]["edit_type"] == "single"
  m = results["metrics"]
  for key in ("efficacy_score", "paraphrase_score", "neighborhood_score",
              "efficacy_magnitude", "fluency", "rewrite_acc", "rephrase_acc",
              "locality_acc", "sr", "gr", "dd", "rr"):
    assert key in m, key
  assert m["sr_at_edit"] >= 2 / 3 * 100  # ROME edits the facts
  assert [s["edits"] for s in results["steps"]] == [1, 2, 3]
  assert all("rr" in s and "dd" in s for s in results["steps"])
  # DD on known_1000 by default, with its ceiling (the accuracy before).
  assert results["command"]["heldout"] == "known_1000"
  assert m["dd_ceiling"] == results["heldout"]["accuracy_before"] > 0
  assert m["dd"] <= m["dd_ceiling"]
  assert "| step |" in (out / "summary.md").read_text()
  assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
  # Bad input is refused before the model loads.
  bad = subprocess.run(cmd[:3] + ["--mode=single", "--batch_size=4",
                                  f"--output_dir={tmp_path / 'bad'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "mode='batch'" in bad.stderr
  assert not (tmp_path / "bad").exists()


def test_evaluate_command_ftl_with_config_overrides(tmp_path):
  out = tmp_path / "ftl"
  cmd = [sys.executable, "-m", "experiments.evaluate", "--method=ftl",
         "--num_edits=2", "--mode=single", "--heldout=none", "--fluency=false",
         "--config.ftl.params_regex=^layers_5/mlp/down_proj/kernel$",
         "--config.ftl.radius=0.004", f"--output_dir={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert results["hparams"]["params_regex"] == "^layers_5/mlp/down_proj/kernel$"
  assert results["hparams"]["radius"] == 0.004
  assert results["metrics"]["efficacy_score"] == 100.0
  assert results["command"]["heldout"] == "none"  # the run can be repeated
  bad = subprocess.run(cmd[:-1] + ["--config.ftl.radius=0",
                                   f"--output_dir={tmp_path / 'bad'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "radius=0" in bad.stderr
  assert not (tmp_path / "bad").exists()


def test_evaluate_command_on_bundled_qaedit(tmp_path):
  """QAEdit questions through the harness (zsRE-style token accuracies; no
  old answers, so no held-out DD by default)."""
  out = tmp_path / "qa"
  cmd = [sys.executable, "-m", "experiments.evaluate", "--method=none",
         "--dataset=qaedit", "--num_edits=2", f"--output_dir={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, KEDITJAX_PROGRESS="0"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert results["n"] == 2 and results["command"]["dataset"] == "qaedit"
  m = results["metrics"]
  assert 0 <= m["zsre_efficacy"] < 100 and m["locality_acc"] == 100.0
  assert "dd" not in m or m["dd"] in (0.0, None)


def test_lifelong_command_resumes_and_refuses_other_settings(tmp_path):
  work = tmp_path / "life"
  cmd = [sys.executable, "-m", "experiments.lifelong", "--method=ultraedit",
         "--num_edits=4", "--batch_size=2", "--checkpoint_every=2",
         "--known_size=4", "--ppl_tokens=512", f"--workdir={work}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((work / "results.json").read_text())
  assert [p["edits"] for p in results["checkpoints"]] == [2, 4]
  last = results["checkpoints"][-1]
  for key in ("efficacy_score", "paraphrase_score", "neighborhood_score",
              "rr", "known_accuracy", "dd", "dd_ceiling", "perplexity"):
    assert key in last, key
  assert last["perplexity"] > 1 and not last["nan"]
  assert results["timing"]["edit_seconds_total"] > 0
  assert (work / "curves.png").read_bytes()[:4] == b"\x89PNG"
  bad = subprocess.run(cmd + ["--config.ultraedit.lr=0.5"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "hparams" in bad.stderr


def test_wild_and_mquake_commands(tmp_path):
  out = tmp_path / "wild.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.wild", "--method=none",
       "--num_edits=2", "--forms=question,chat", "--max_new_tokens=8",
       f"--output={out}"], cwd=ROOT, capture_output=True, text=True,
      timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  m = results["metrics"]
  for key in ("rewrite_acc", "sr", "locality_acc", "question/reliability_exact",
              "question/reliability_contains", "chat/generality_contains",
              "chat/locality"):
    assert key in m, key
  # The unedited model keeps its own answers: locality 100 by definition.
  assert m["question/locality"] == m["chat/locality"] == 100.0
  assert "qa/reliability_exact" not in m
  out = tmp_path / "mquake.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.mquake", "--methods=none",
       "--num_cases=2", "--max_new_tokens=8", "--form=chat",
       f"--output={out}"], cwd=ROOT, capture_output=True, text=True,
      timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  [row] = results["rows"]
  assert row["n"] == 2 and {"old_tf", "new_wild_contains"} <= set(row)
  assert results["command"]["form"] == "chat"
