"""The bundled data (keditjax.data): names, overrides, paths, hf:, and proof
that nothing outside the repository is read."""

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from keditjax import data, errors, stats
from keditjax.evaluation import cases as C
from keditjax.evaluation import fever

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = {"counterfact": 10000, "counterfact-train": 10000, "zsre": 1037,
          "zsre-train": 1000, "mquake": 354, "known_1000": 1209,
          "fever": 9999, "qaedit": 700}


def test_every_name_is_bundled_with_provenance_and_its_record_count():
  assert set(data.names("dataset")) == set(COUNTS)
  assert data.names("corpus") == ["wikitext-2"]
  for name, count in COUNTS.items():
    path = data.path(name)
    assert path.startswith(data.PACKAGE_DIR) and path.endswith(".gz"), path
    assert os.path.isfile(os.path.join(os.path.dirname(path),
                                       "PROVENANCE.txt")), name
    assert len(data.read_records(name)) == count, name
  corpus = data.path("wikitext-2")
  assert os.path.isfile(os.path.join(corpus, "PROVENANCE.txt"))
  assert len(os.listdir(os.path.join(data.PACKAGE_DIR, "licenses"))) >= 4


def test_bundled_files_decompress_to_the_sources_recorded_in_the_manifest():
  manifest = json.load(open(os.path.join(data.PACKAGE_DIR, "MANIFEST.json")))
  assert len(manifest) >= 9
  for rel, want in manifest.items():
    raw = gzip.open(os.path.join(data.PACKAGE_DIR, rel)).read()
    assert len(raw) == want["bytes"], rel
    assert hashlib.sha256(raw).hexdigest() == want["sha256"], rel
  # The bundle stays small enough for a clone and a wheel.
  total = sum(os.path.getsize(os.path.join(r, f))
              for r, _, fs in os.walk(data.PACKAGE_DIR) for f in fs)
  assert total < 40e6, total


def test_unknown_names_and_wrong_kinds_are_refused_with_the_known_ones():
  with pytest.raises(errors.InputError, match="known: .*counterfact.*qaedit"):
    data.path("counterfactt")
  with pytest.raises(errors.InputError, match="known: "):
    C.load_cases("zsre", "nope")
  with pytest.raises(errors.InputError, match="not a dataset"):
    data.path("wikitext-2", kind="dataset")
  with pytest.raises(errors.InputError, match="not a corpus"):
    stats.resolve_corpus("zsre")
  with pytest.raises(errors.InputError, match="does not exist"):
    data.path("missing/file.json")


def test_explicit_paths_win_and_gzip_is_transparent(tmp_path):
  rows = data.read_records("zsre")[:2]
  plain = tmp_path / "mine.json"
  plain.write_text(json.dumps(rows))
  packed = tmp_path / "mine.json.gz"
  packed.write_bytes(gzip.compress(json.dumps(rows).encode()))
  for path in (plain, packed):
    got = C.load_cases("zsre", str(path))
    assert [c.target_new for c in got] == [" " + r["alt"] for r in rows]
  lines = tmp_path / "fever.jsonl.gz"
  lines.write_bytes(gzip.compress(b"\n".join(
      json.dumps(r).encode() for r in data.read_records("fever")[:30])))
  assert 0 < len(fever.load(str(lines))) <= 30


def test_keditjax_data_overrides_names_and_falls_back_to_the_bundle(
    tmp_path, monkeypatch):
  rows = data.read_records("zsre")[5:8]
  (tmp_path / "zsre").mkdir()
  # The original (uncompressed) layout of the development data folder.
  (tmp_path / "zsre" / "zsre_mend_eval_portability_gpt4.json").write_text(
      json.dumps(rows))
  monkeypatch.setenv("KEDITJAX_DATA", str(tmp_path))
  assert data.path("zsre").startswith(str(tmp_path))
  assert [c.request.subject for c in C.load_cases("zsre")] == [
      r["subject"] for r in rows]
  assert data.path("counterfact").startswith(data.PACKAGE_DIR)


def test_hf_local_datasets_load_through_datasets(tmp_path):
  datasets = pytest.importorskip("datasets")
  rows = data.read_records("zsre")[:4]
  keep = ("subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans")
  table = datasets.Dataset.from_list([{k: r[k] for k in keep} for r in rows])
  table.save_to_disk(str(tmp_path / "one"))
  datasets.DatasetDict({"validation": table}).save_to_disk(
      str(tmp_path / "dict"))
  want = [" " + r["alt"] for r in rows]
  assert [c.target_new for c in C.load_cases(
      "zsre", f"hf:{tmp_path / 'one'}")] == want
  assert [c.target_new for c in C.load_cases(
      "zsre", f"hf:{tmp_path / 'dict'}:validation")] == want
  with pytest.raises(errors.InputError, match="no split 'train'"):
    data.read_records(f"hf:{tmp_path / 'dict'}")
  # A text corpus saved the same way feeds the covariance statistics.
  datasets.Dataset.from_dict({"text": ["a b c", "", "= T =", "d e"]}
                             ).save_to_disk(str(tmp_path / "text"))
  assert list(stats.corpus_texts(f"hf:{tmp_path / 'text'}")) == [
      "a b c", "d e"]


def test_hf_hub_ids_fail_at_once_without_network(tmp_path, monkeypatch):
  pytest.importorskip("datasets")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
  # A closed local port: refused immediately, as on a machine offline.
  monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
  with pytest.raises(errors.InputError, match="no network access"):
    data.read_records("hf:someone/some-dataset:train")
  with pytest.raises(errors.InputError, match="no network access"):
    stats.resolve_corpus("hf:wikitext:wikitext-2-raw-v1:train")
  monkeypatch.delenv("HF_ENDPOINT")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  with pytest.raises(errors.InputError, match="HF_DATASETS_OFFLINE is set"):
    C.load_cases("zsre", "hf:someone/some-dataset")
  assert not (tmp_path / "hf").exists()  # no partial cache
  with pytest.raises(errors.InputError, match="use 'hf:NAME'"):
    data.read_records("hf::train")


def test_qaedit_records_become_edit_cases():
  cases = C.load_cases("qaedit", limit=3)
  raw = data.read_records("qaedit")[:3]
  for case, row in zip(cases, raw):
    assert case.case_id == row["id"] and case.source == "qaedit"
    assert case.request.text == row["prompt"]
    assert case.target_new == " " + row["target"] and case.target_true is None
    assert case.paraphrase_prompts == (row["rephrase"],)
    assert case.neighborhood == tuple(
        (l["loc"], l["loc_ans"]) for l in row["locality"])
  bad = dict(raw[0], locality=[{"loc": "q"}])
  with pytest.raises(errors.InputError, match="loc_ans"):
    C.parse_cases([bad], "qaedit")


# Paths of a development machine, or the data folder beside the repository.
_FORBIDDEN = re.compile(
    r"""\.\./shared|["']shared["']\s*,\s*["']data|/work/|/home/[a-z]|/root/""")


def test_no_code_names_a_folder_outside_the_repository():
  bad = []
  for top in ("keditjax", "experiments", "colab"):
    for root, _, files in os.walk(os.path.join(ROOT, top)):
      for name in files:
        if name.endswith((".py", ".ipynb", ".cfg", ".toml")):
          path = os.path.join(root, name)
          for i, line in enumerate(open(path, encoding="utf-8"), 1):
            if _FORBIDDEN.search(line):
              bad.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
  assert not bad, "\n".join(bad)


_AUDIT = r"""
import os, sys
shared = os.path.realpath(sys.argv[1])
seen = []
def hook(event, args):
  if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
    path = os.path.realpath(os.fsdecode(args[0]))
    if path == shared or path.startswith(shared + os.sep):
      seen.append(path)
sys.addaudithook(hook)
os.environ.pop("KEDITJAX_DATA", None)
import itertools
from keditjax import data, stats
from keditjax.evaluation import cases, fever, hypernet
for name in data.names("dataset"):
  data.read_records(name)
for name in ("counterfact", "zsre", "mquake", "qaedit"):
  cases.load_cases(name, limit=3)
cases.load_facts(limit=3); cases.load_claims(limit=3); fever.load("fever")
corpus = stats.resolve_corpus(None)
list(itertools.islice(corpus.texts(), 5)); corpus.identity
print("OPENED", len(seen), seen[:3])
"""


def test_nothing_reads_the_development_data_folder(tmp_path):
  """With the development copy beside the repository (as on the machines
  that build keditjax), every default still comes from the package."""
  shared = os.path.join(os.path.dirname(ROOT), "shared")
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("KEDITJAX_DATA", None)
  out = subprocess.run([sys.executable, "-c", _AUDIT, shared], cwd=tmp_path,
                       env=env, capture_output=True, text=True, check=True)
  assert "OPENED 0 []" in out.stdout, out.stdout + out.stderr
