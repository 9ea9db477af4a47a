"""Issue 5's vision acceptance, run as a user would: the MNIST CNN with the
library's default editor settings (`vision.DEFAULT_HPARAMS`)."""

import numpy as np
import pytest

from keditjax.evaluation import vision


@pytest.fixture(scope="module")
def setup():
  return vision.prepare("mnist", num_edits=50, progress=False)


def _run(setup, method, mode, n):
  editor = vision.build_editors([method], {})[method]
  return vision.run_vision(setup.classifier, editor, setup.cases[:n],
                           mode=mode, test_images=setup.data.test_images,
                           test_labels=setup.data.test_labels,
                           init_kwargs=setup.init_kwargs, progress=False)


def test_classifier_and_cases(setup):
  assert setup.test_accuracy > 97.0
  logits = np.asarray(setup.classifier.logits(
      setup.classifier.params, np.stack([c.image for c in setup.cases])))
  # flip_to="runner_up": the new label is the model's second choice.
  assert [c.label for c in setup.cases] == list(np.argsort(logits, -1)[:, -2])
  assert all(c.label != c.true_label for c in setup.cases)


@pytest.mark.parametrize("method", ["ftl", "ewc"])
def test_single_edits_on_50_images_succeed_with_dd_below_one_point(setup,
                                                                   method):
  metrics = _run(setup, method, "single", 50)["metrics"]
  assert metrics["sr"] == 100.0, metrics
  assert metrics["dd"] < 1.0, metrics


def test_successive_ewc_draws_down_less_than_ft(setup):
  ft = _run(setup, "ft", "sequential", 20)
  ewc = _run(setup, "ewc", "sequential", 20)
  # Equal SR when each edit is made; EWC's anchor keeps the rest in place.
  assert ft["metrics"]["sr_at_edit"] == ewc["metrics"]["sr_at_edit"] == 100.0
  assert ewc["metrics"]["dd"] < ft["metrics"]["dd"] - 2.0, (
      ewc["metrics"], ft["metrics"])
  assert len(ewc["steps"]) == 20 and all("dd" in s for s in ewc["steps"])
