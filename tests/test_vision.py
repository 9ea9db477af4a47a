"""Vision editing: bundled datasets, the CNN, edit cases, metrics, launcher."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from keditjax import errors
from keditjax.editors.base import EditInfo, FunctionalEditor
from keditjax.evaluation import vision, vision_data
from keditjax.models import cnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = {"steps": 300, "batch_size": 64, "lr": 3e-3, "seed": 0,
         "label_smoothing": 0.1}


@pytest.fixture(scope="module")
def digits():
  return vision_data.load_dataset("digits")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("keditjax_cache"))


@pytest.fixture(scope="module")
def trained(digits, cache_root):
  return cnn.load_or_train(digits.train_images, digits.train_labels,
                           cache_dir=os.path.join(cache_root, "vision"),
                           progress=False, **TRAIN)


def forcing_editor():
  """Sets the head bias to 1000·onehot(label): every image becomes `label`."""
  def init(model, params, **kwargs):
    return {"edits": 0, "init_kwargs": sorted(kwargs)}

  def apply(model, params, requests, state):
    del model
    (request,) = requests
    bias = np.zeros_like(params["head"]["bias"])
    bias[request.label] = 1e3
    new = {**params, "head": {**params["head"], "bias": bias}}
    return new, {**state, "edits": state["edits"] + 1}, EditInfo(
        extras={"losses": np.array([2.0, 0.5])})
  return FunctionalEditor("force", None, init, apply)


def test_splits_are_stratified_deterministic_and_read_only(digits):
  assert digits.train_images.shape == (1297, 8, 8, 1)
  assert digits.test_images.shape == (500, 8, 8, 1)
  assert digits.train_images.dtype == np.float32
  assert 0.0 <= digits.train_images.min() and digits.train_images.max() <= 1.0
  assert np.bincount(digits.test_labels).min() >= 48
  again = vision_data.load_dataset("digits")
  np.testing.assert_array_equal(again.test_images, digits.test_images)
  np.testing.assert_array_equal(again.train_labels, digits.train_labels)
  other = vision_data.load_dataset("digits", seed=1)
  assert not np.array_equal(other.test_labels, digits.test_labels)
  with pytest.raises(ValueError):
    digits.test_images[0, 0, 0, 0] = 1.0
  mnist = vision_data.load_dataset("mnist")
  assert mnist.train_images.shape == (4000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(mnist.test_labels), [100] * 10)
  with pytest.raises(errors.ConfigError, match="unknown dataset"):
    vision_data.load_dataset("cifar")


def test_cnn_trains_caches_and_names_its_params(digits, trained, cache_root):
  classifier, info = trained
  accuracy = np.mean(classifier.predict(classifier.params, digits.test_images)
                     == digits.test_labels)
  assert accuracy > 0.9, accuracy
  assert classifier.num_classes == 10 and classifier.image_shape == (8, 8, 1)
  assert set(classifier.params) == {"conv1", "conv2", "dense1", "head"}
  assert classifier.params["head"]["kernel"].shape == (64, 10)
  logits = classifier.logits(classifier.params, digits.test_images[:3])
  assert logits.shape == (3, 10)
  again, info2 = cnn.load_or_train(
      digits.train_images, digits.train_labels, progress=False,
      cache_dir=os.path.join(cache_root, "vision"), **TRAIN)
  assert not info["from_cache"] and info2["from_cache"]
  assert info2["cache_path"] == info["cache_path"]
  for a, b in zip(*map(lambda c: jax_leaves(c.params), (classifier, again))):
    np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_corrupt_or_mismatched_cache_raises(trained, tmp_path, digits):
  classifier, info = trained
  path = tmp_path / "vision" / os.path.basename(info["cache_path"])
  path.parent.mkdir()
  path.write_bytes(open(info["cache_path"], "rb").read()[:100])
  with pytest.raises(errors.CheckpointError, match="corrupt"):
    cnn.load_or_train(digits.train_images, digits.train_labels,
                      cache_dir=str(path.parent), progress=False, **TRAIN)
  small = cnn.init_classifier(cnn.ClassifierConfig(image_shape=(8, 8, 1),
                                                   hidden=32))
  cnn.save_params(str(path), small.params)
  with pytest.raises(errors.CheckpointError, match="does not match"):
    cnn.load_params(str(path), classifier.config)


def test_neighbourhood_shifts_are_exact(digits):
  image = digits.test_images[0]
  hood = vision_data.neighbourhood(image)
  assert hood.shape == (len(vision_data.NEIGHBOURS), 8, 8, 1)
  up, down, left, right = hood[:4]
  np.testing.assert_array_equal(up[:-1], image[1:])
  np.testing.assert_array_equal(up[-1], 0)
  np.testing.assert_array_equal(down[1:], image[:-1])
  np.testing.assert_array_equal(left[:, :-1], image[:, 1:])
  np.testing.assert_array_equal(right[:, 1:], image[:, :-1])
  np.testing.assert_array_equal(right[:, 0], 0)
  noise = hood[4:6] - image
  assert 0.0 < np.abs(noise).max() < 0.5 and not np.allclose(*hood[4:6])
  np.testing.assert_allclose(hood[6], 0.9 * image, rtol=1e-6)
  np.testing.assert_array_equal(vision_data.neighbourhood(image), hood)
  assert hood.min() >= 0.0 and hood.max() <= 1.0


def test_flip_and_correct_cases(trained, digits):
  classifier, _ = trained
  pred = classifier.predict(classifier.params, digits.test_images)
  flips = vision.make_cases(classifier, digits.test_images, digits.test_labels,
                            kind="flip", num_edits=50)
  for case in flips:
    assert case.label != case.true_label == digits.test_labels[case.case_id]
    assert case.label != pred[case.case_id] and 0 <= case.label < 10
    np.testing.assert_array_equal(case.image, digits.test_images[case.case_id])
  assert len({c.case_id for c in flips}) == 50
  assert [c.label for c in flips] == [c.label for c in vision.make_cases(
      classifier, digits.test_images, digits.test_labels, kind="flip",
      num_edits=50)]
  wrong = int((pred != digits.test_labels).sum())
  fixes = vision.make_cases(classifier, digits.test_images, digits.test_labels,
                            kind="correct", num_edits=wrong)
  assert all(c.label == c.true_label != pred[c.case_id] for c in fixes)
  with pytest.raises(errors.InputError, match="eligible"):
    vision.make_cases(classifier, digits.test_images, digits.test_labels,
                      kind="correct", num_edits=wrong + 1)


def test_image_edit_validation():
  image = np.zeros((8, 8, 1), np.float32)
  vision.validate_edit(vision.ImageEdit(image, 3), 10, (8, 8, 1))
  with pytest.raises(errors.InputError, match="label=10"):
    vision.validate_edit(vision.ImageEdit(image, 10), 10, (8, 8, 1))
  with pytest.raises(errors.InputError, match="NaN"):
    vision.validate_edit(vision.ImageEdit(image + np.nan, 1), 10, (8, 8, 1))
  with pytest.raises(errors.InputError, match="shape"):
    vision.validate_edit(vision.ImageEdit(image[0], 1), 10, (8, 8, 1))


def _cases_and_kept(classifier, digits, n):
  cases = vision.make_cases(classifier, digits.test_images, digits.test_labels,
                            kind="flip", num_edits=n)
  keep = np.ones(len(digits.test_labels), bool)
  keep[[c.case_id for c in cases]] = False
  return cases, digits.test_labels[keep]


def test_single_mode_with_a_forcing_editor(trained, digits):
  classifier, _ = trained
  before = jax_leaves(classifier.params)
  cases, kept = _cases_and_kept(classifier, digits, 6)
  r = vision.run_vision(classifier, forcing_editor(), cases, mode="single",
                        test_images=digits.test_images,
                        test_labels=digits.test_labels, progress=False,
                        init_kwargs={"kl_inputs": digits.train_images[:4]})
  m = r["metrics"]
  assert m["sr"] == 100.0 and m["gr"] == 100.0 and m["rr"] is None
  after = [100.0 * np.mean(kept == c.label) for c in cases]
  np.testing.assert_allclose(m["test_accuracy_after"], np.mean(after))
  np.testing.assert_allclose(m["dd"], m["test_accuracy_before"] - np.mean(after))
  assert r["protocol"]["dd_set"].startswith(f"test split minus the edited "
                                            f"images ({len(kept)}")
  assert [row["case_id"] for row in r["cases"]] == [c.case_id for c in cases]
  assert r["cases"][0]["losses"] == 0.5 and r["steps"] == []
  for a, b in zip(before, jax_leaves(classifier.params)):
    np.testing.assert_array_equal(a, b)


def test_sequential_mode_with_a_forcing_editor(trained, digits):
  classifier, _ = trained
  cases, kept = _cases_and_kept(classifier, digits, 5)
  labels = np.array([c.label for c in cases])
  r = vision.run_vision(classifier, forcing_editor(), cases, mode="sequential",
                        eval_every=2, test_images=digits.test_images,
                        test_labels=digits.test_labels, progress=False)
  m = r["metrics"]
  last = labels[-1]
  assert m["sr_at_edit"] == 100.0
  np.testing.assert_allclose(m["sr"], 100.0 * np.mean(labels == last))
  np.testing.assert_allclose(m["rr"], 100.0 * np.mean(labels[:-1] == last))
  np.testing.assert_allclose(
      m["dd"], m["test_accuracy_before"] - 100.0 * np.mean(kept == last))
  assert [s["edits"] for s in r["steps"]] == [1, 2, 3, 4, 5]
  assert [s["edits"] for s in r["steps"] if "rr" in s] == [2, 4, 5]
  assert [row["step"] for row in r["cases"]] == [1, 2, 3, 4, 5]
  unedited = vision.run_vision(classifier, None, cases,
                               test_images=digits.test_images,
                               test_labels=digits.test_labels, progress=False)
  assert unedited["metrics"]["sr"] == 0.0 and unedited["metrics"]["dd"] == 0.0


def test_protocol_and_hparams_errors(trained, digits):
  classifier, _ = trained
  cases, _ = _cases_and_kept(classifier, digits, 1)
  kw = dict(test_images=digits.test_images, test_labels=digits.test_labels)
  with pytest.raises(errors.ConfigError, match="mode"):
    vision.run_vision(classifier, forcing_editor(), cases, mode="batch", **kw)
  with pytest.raises(errors.InputError, match="label"):
    vision.run_vision(classifier, forcing_editor(),
                      [vision.ImageEdit(cases[0].image, -1)], **kw)
  assert vision.parse_hparams("steps=20,params_regex=dense1|head,lr=1e-3") == {
      "steps": 20, "params_regex": "dense1|head", "lr": 1e-3}
  with pytest.raises(errors.ConfigError, match="key=value"):
    vision.parse_hparams("steps")
  with pytest.raises(errors.UnsupportedConfigError, match="nonsense"):
    vision.build_editors(("ft",), {"nonsense": 1})
  built = vision.build_editors(vision.METHODS, {"radius": 0.01, "steps": 3})
  assert built["ftl"].hparams.radius == 0.01 and built["ewc"].hparams.steps == 3


_CHECK_FLAGS = """
import sys
from absl import flags
from experiments import vision_edit
from keditjax import errors
for arg in sys.argv[1:]:
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["vision_edit", "--dataset=digits", "--output_dir=x", arg])
  try:
    vision_edit.build()
    print(arg, "accepted")
  except errors.ConfigError as e:
    print(arg, type(e).__name__, str(e).split("=")[0])
"""


def test_launcher_rejects_bad_flags_before_work():
  # A subprocess: importing the launcher here would register its absl flags
  # in the test process, where another launcher may define the same names.
  bad = ["--method=rome", "--num_edits=0", "--num_edits=501", "--mode=batch",
         "--edits=swap", "--hparams=nonsense=1"]
  proc = subprocess.run([sys.executable, "-c", _CHECK_FLAGS, *bad], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[:5] == [
      "--method=rome ConfigError --method",
      "--num_edits=0 ConfigError --num_edits",
      "--num_edits=501 ConfigError --num_edits",
      "--mode=batch ConfigError --mode", "--edits=swap ConfigError --edits"]
  assert lines[5].startswith("--hparams=nonsense=1 UnsupportedConfigError")


def test_launcher_runs_every_method_and_plots(trained, cache_root, tmp_path):
  del trained  # the launcher finds this classifier in the cache.
  out = tmp_path / "all"
  cmd = [sys.executable, "-m", "experiments.vision_edit", "--dataset=digits",
         "--method=all", "--num_edits=3", "--mode=sequential",
         "--hparams=steps=5,lr=1e-3,fisher_examples=64", "--kl_inputs=16",
         f"--train_steps={TRAIN['steps']}", f"--train_lr={TRAIN['lr']}",
         f"--label_smoothing={TRAIN['label_smoothing']}",
         f"--output_dir={out}"]
  env = dict(os.environ, KEDITJAX_CACHE=cache_root)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "train cnn" not in proc.stderr  # loaded from the cache
  combined = json.loads((out / "results.json").read_text())
  assert set(combined["methods"]) == set(vision.METHODS)
  for method in vision.METHODS:
    r = json.loads((out / method / "results.json").read_text())
    assert set(r["metrics"]) >= {"sr", "gr", "dd", "rr",
                                 "test_accuracy_before"}
    assert r["protocol"]["edits"] == "flip" and len(r["cases"]) == 3
    assert r["classifier"]["from_cache"] and r["hparams"]["steps"] == 5
    assert len(r["steps"]) == 3 and (out / method / "metrics.png").exists()
  assert (out / "compare.png").stat().st_size > 1000
  assert "| ewc |" in (out / "summary.md").read_text()
  shutil.rmtree(out)


def test_tradeoff_launcher_sweeps_and_plots(cache_root, tmp_path):
  out = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "experiments.tradeoff", "--task=vision",
         "--dataset=digits", "--num_edits=3", "--ftl=1e-3,1e-2",
         "--ftkl=1,10", "--ewc=1e3,1e4", f"--output_dir={out}"]
  env = dict(os.environ, KEDITJAX_CACHE=cache_root)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "results.json").read_text())
  assert [(r["method"], r["value"]) for r in result["rows"]] == [
      ("ftl", 1e-3), ("ftl", 1e-2), ("ftkl", 1.0), ("ftkl", 10.0),
      ("ewc", 1e3), ("ewc", 1e4)]
  for r in result["rows"]:
    assert 0 <= r["sr"] <= 100 and "dd" in r and "gr" in r
  assert result["chosen"] == vision.default_strengths()
  assert set(result["monotonicity"]) == {"ftl", "ftkl", "ewc"}
  for name in ("sr_dd.png", "strength.png", "summary.md"):
    assert (out / name).stat().st_size > 100
