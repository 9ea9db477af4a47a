"""The README's quick start, CI and the Colab notebook stay in sync and work."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
  text = open(os.path.join(ROOT, "README.md")).read()
  quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```(?:bash|sh)?\n(.*?)\n```", quick, re.S)


def test_quick_start_is_two_commands_and_ci_runs_the_second():
  commands = _readme_commands()
  assert len(commands) == 2 and all("\n" not in c for c in commands)
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert commands[1] in ci.splitlines()


def test_colab_notebook_runs(smollm2, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(os.path.join(ROOT, "colab", "quickstart.ipynb"), as_version=4)
  nbformat.validate(nb)
  from keditjax import models
  monkeypatch.setattr(models, "load", lambda name="smollm2-135m", **kw: smollm2)
  scope = {}
  for cell in nb.cells:
    if cell.cell_type == "code":
      exec(compile(cell.source, "notebook", "exec"), scope)
  assert float(scope["logp_paris"](-3.0 * scope["g"] / (scope["g"] ** 2).sum() ** 0.5)) < \
      float(scope["logp_paris"](0 * scope["g"]))
