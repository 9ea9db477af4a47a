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


def _run_notebook(name: str, cwd: str):
  """Executes colab/`name` in a fresh kernel (QUICK mode), as Colab would."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
  nbformat.validate(nb)
  saved = dict(os.environ)
  os.environ["KEDITJAX_NOTEBOOK_QUICK"] = "1"
  os.environ["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  try:
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": cwd}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(saved)
  return nb


def test_colab_notebook_runs_top_to_bottom():
  """Executes the notebook in a fresh Jupyter kernel, as Colab would (QUICK
  mode: identity covariance, few templates)."""
  nb = _run_notebook("quickstart.ipynb", os.path.join(ROOT, "colab"))
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
  assert "backend: cpu" in text and "after " in text and "rome" in text
  after = [l for l in text.splitlines() if l.startswith("after ")][0]
  assert float(after.split("P(English)=")[1].split()[0]) > 0.5
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images, "the plot cell drew nothing"


def test_train_hypernet_notebook_runs_top_to_bottom():
  """colab/train_hypernet.ipynb trains a tiny MEND, edits, resumes (QUICK)."""
  nb = _run_notebook("train_hypernet.ipynb", ROOT)
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
  assert "backend: cpu" in text and "resumed from step 60 -> step 80" in text
  line = [l for l in text.splitlines() if l.startswith("log P(Oslo)")][0]
  before, after = (float(x) for x in line.replace("before", "").split(
      ":")[1].split("after"))
  assert after > before
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images, "the training-curve cell drew nothing"


# Each package of keditjax may import only the packages listed for it (its
# lower layers): the editors hold the math, the evaluation binds it to data.
LAYERS = {
    "errors": set(),
    "data": {"errors"},
    "progress": set(),
    "compilation_cache": set(),
    "memory": set(),
    "kernels": {"errors"},
    "models": {"errors", "progress"},
    "sharding": {"errors", "models"},
    "stats": {"data", "errors", "kernels", "models", "progress", "sharding"},
    "training": {"errors", "progress", "sharding"},
    "analysis": {"errors", "models", "progress"},
    # editors read the bundled corpora for memories of unrelated text
    # (T-Patcher's memory loss, WISE's out-of-scope prompts).
    "editors": {"data", "errors", "kernels", "models", "progress", "sharding",
                "stats", "training"},
    "evaluation": {"data", "editors", "errors", "kernels", "models",
                   "progress", "sharding", "stats", "training"},
    # the top layer: live editing, rollback, manifests and verify.
    "stream": {"data", "editors", "errors", "evaluation", "kernels",
               "models", "progress", "sharding", "stats", "training"},
}


def _keditjax_imports(path):
  import ast  # pylint: disable=import-outside-toplevel
  for node in ast.walk(ast.parse(open(path).read())):  # lazy imports too
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module.split(".")[0] == "keditjax"):
      parts = node.module.split(".")
      yield from ([a.name for a in node.names] if len(parts) == 1
                  else [parts[1]])
    elif isinstance(node, ast.Import):
      yield from (a.name.split(".")[1] for a in node.names
                  if a.name.startswith("keditjax."))


def test_packages_import_only_their_lower_layers():
  bad = []
  package_dir = os.path.join(ROOT, "keditjax")
  for root, _, files in os.walk(package_dir):
    for name in files:
      if not name.endswith(".py") or root == package_dir:
        continue
      path = os.path.join(root, name)
      layer = os.path.relpath(path, package_dir).split(os.sep)[0]
      layer = layer[:-3] if layer.endswith(".py") else layer
      assert layer in LAYERS, f"{layer}: add it to LAYERS"
      bad += [f"{os.path.relpath(path, ROOT)} imports keditjax.{used}"
              for used in _keditjax_imports(path)
              if used != layer and used not in LAYERS[layer]]
  for name in os.listdir(package_dir):  # top-level modules
    if name.endswith(".py") and name != "__init__.py":
      layer = name[:-3]
      assert layer in LAYERS, f"{layer}: add it to LAYERS"
      bad += [f"keditjax/{name} imports keditjax.{used}"
              for used in _keditjax_imports(os.path.join(package_dir, name))
              if used != layer and used not in LAYERS[layer]]
  assert not bad, bad


def _module_graph():
  """keditjax module -> the keditjax modules it imports (lazy imports too)."""
  import ast  # pylint: disable=import-outside-toplevel
  package_dir = os.path.join(ROOT, "keditjax")
  paths = {}
  for root, _, files in os.walk(package_dir):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        paths[mod[:-9] if mod.endswith(".__init__") else mod] = path
  graph = {}
  for mod, path in paths.items():
    edges = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and node.module:
        for a in node.names:
          full = f"{node.module}.{a.name}"
          edges.add(full if full in paths else node.module)
      elif isinstance(node, ast.Import):
        edges.update(a.name for a in node.names)
    graph[mod] = {e for e in edges if e in paths and e != mod}
  return graph


def test_no_import_cycle_among_modules():
  """No module reaches itself through imports (counting lazy ones): a
  cycle means two modules that cannot be understood apart. Package
  `__init__`s are skipped as targets (they re-export their children)."""
  graph = _module_graph()
  packages = {m for m in graph if any(o.startswith(m + ".") for o in graph)}
  graph = {m: {e for e in es if e not in packages} for m, es in graph.items()}
  cycles, state = [], {}

  def visit(mod, path):
    state[mod] = "open"
    for nxt in sorted(graph[mod]):
      if state.get(nxt) == "open":
        cycles.append(path[path.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[mod] = "done"

  for mod in sorted(graph):
    if mod not in state:
      visit(mod, [mod])
  assert not cycles, cycles


def test_import_keditjax_is_light_and_exposes_submodules_lazily():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ("import sys, keditjax; print('jax' in sys.modules); "
          "print(callable(keditjax.models.load), keditjax.data.names()[0]); "
          "print('keditjax.models' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                       capture_output=True, check=True,
                       env=dict(os.environ, PYTHONPATH=ROOT)).stdout.split()
  assert out == ["False", "True", "counterfact", "True"], out
  import keditjax  # pylint: disable=import-outside-toplevel
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    keditjax.nope  # pylint: disable=pointless-statement
  assert {"models", "editors", "evaluation", "data"} <= set(dir(keditjax))


def test_stream_and_verify_notebook_runs_top_to_bottom():
  """colab/stream_and_verify.ipynb: live edits under a reader, rollback,
  save, verify OK, then three tamperings each reported (QUICK mode)."""
  nb = _run_notebook("stream_and_verify.ipynb", os.path.join(ROOT, "colab"))
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
  assert "backend: cpu" in text
  assert "last edit rolled back bit for bit: True" in text
  reports = [l for l in text.splitlines() if ": OK" in l or "FAILED" in l]
  assert len(reports) == 4 and ": OK" in reports[0], reports
  assert all("FAILED" in r for r in reports[1:]), reports
  assert "layers.3" in text or "layers_3" in text      # the flipped byte
  assert "rank 1" in text                              # the hidden edit
  assert "signature" in text.lower()
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images, "the reader's plot cell drew nothing"
