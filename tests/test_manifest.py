"""Edit manifests and verify: clean edits verify, tampering is reported."""

import json
import os
import shutil
import struct
import types

import numpy as np
import pytest

from keditjax import editors, errors, models
from keditjax.editors import base
from keditjax.stream import manifest as manifest_lib
from keditjax.stream import verify as verify_lib
from tests.conftest import make_tiny_lm

KEY = b"a test signing key"
# Same-length prompts and targets: one compiled shape for every ROME edit.
REQUESTS = [{"prompt": f"{name} speaks", "subject": name, "target_new": new}
            for name, new in (("Kalo", "Greek"), ("Miro", "Latin"),
                              ("Tabo", "Dutch"))]
LOOSE = dict(clamp_norm_factor=1e4, v_weight_decay=0.0,
             v_compute_dtype="float32")
DOWN = "layers_{}/mlp/down_proj/kernel"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Two declared ROME edits (saved signed), and a third, undeclared one."""
  model = make_tiny_lm()
  editor = editors.get("rome", layer=2, use_covariance=False, v_steps=3,
                       **LOOSE)
  state = editor.init(model, templates=("{}",))
  params, infos = [model.params], []
  for request in REQUESTS:
    new, _, info = editor.apply(model, params[-1], request, state)
    params.append(new)
    infos.append(info)
  manifests = [manifest_lib.Manifest.start(model)]
  for i in range(3):
    manifests.append(manifests[-1].with_apply(editor, infos[i], params[i],
                                              params[i + 1]))
  clean = str(tmp_path_factory.mktemp("clean"))
  manifest_lib.save_edited(clean, model, params[2], manifests[2], key=KEY,
                           overwrite=True)
  return types.SimpleNamespace(model=model, editor=editor, params=params,
                               infos=infos, manifests=manifests, clean=clean,
                               tmp=tmp_path_factory)


def _copy(run, name):
  target = str(run.tmp.mktemp(name))
  shutil.rmtree(target)
  shutil.copytree(run.clean, target)
  return target


def _problems(report):
  return [(f.kind, f.tensor, f.layer) for f in report.problems]


def _rewrite_manifest(directory, change):
  path = os.path.join(directory, manifest_lib.MANIFEST)
  with open(path) as f:
    data = json.load(f)
  change(data)
  with open(path, "wb") as f:
    f.write(manifest_lib.canonical_bytes(data))


def test_clean_edits_verify_and_the_manifest_round_trips(run):
  report = verify_lib.verify(run.model.params, run.clean, key=KEY)
  assert report.ok, report.summary()
  assert report.signature == "ok"
  assert report.operations == (("apply", "rome"), ("apply", "rome"))
  assert report.tensors[DOWN.format(2)] == "explained"
  assert report.tensors[DOWN.format(1)] == "unchanged"
  assert "OK" in report.summary().splitlines()[0]
  json.dumps(report.to_json())
  loaded = manifest_lib.load_manifest(run.clean)
  written = run.manifests[2]
  assert loaded.to_json()["operations"] == written.to_json()["operations"]
  assert loaded.base == written.base and loaded.after is not None
  assert sorted(loaded.arrays) == sorted(written.arrays)
  record = run.infos[0].records[0]
  op = loaded.operations[0]
  assert op.records[0]["id"] == record.id and op.hparams["layer"] == 2
  (delta,) = op.deltas
  assert delta.form == "factored" and delta.record == record.id
  # The declared delta is the record's own factors (same digest).
  assert delta.sha256 == record.touched[0].to_json()["sha256"]
  assert manifest_lib.combined_digest(manifest_lib.fingerprint(
      run.model.params)) == loaded.base["sha256"]
  assert run.manifests[3].prefix(2).to_json() == written.to_json()


def _flip_byte(directory, tensor, element):
  """XORs the lowest byte of one float32 element of a safetensors tensor."""
  path = os.path.join(directory, "model.safetensors")
  with open(path, "rb") as f:
    data = bytearray(f.read())
  (size,) = struct.unpack("<Q", data[:8])
  start = 8 + size + json.loads(data[8:8 + size])[tensor]["data_offsets"][0]
  data[start + 4 * element] ^= 0xFF
  with open(path, "wb") as f:
    f.write(data)


def test_a_flipped_byte_is_reported_with_tensor_and_layer(run):
  flipped = _copy(run, "flipped")
  _flip_byte(flipped, "model.layers.1.mlp.down_proj.weight", 5)
  report = verify_lib.verify(run.model.params, flipped, key=KEY)
  assert not report.ok
  assert ("hash_mismatch", DOWN.format(1), 1) in _problems(report)
  (unexplained,) = [f for f in report.problems if f.kind == "unexplained"]
  assert (unexplained.tensor, unexplained.rank) == (DOWN.format(1), 1)
  assert report.signature == "ok"  # the manifest itself is intact
  assert "layer 1" in report.summary()
  # The original checkpoint is untouched.
  assert verify_lib.verify(run.model.params, run.clean).ok


def test_an_undeclared_edit_is_unexplained_with_its_layer_and_rank_one(run):
  planted = str(run.tmp.mktemp("backdoor"))
  # The third edit is applied, its operation is not in the manifest.
  manifest_lib.save_edited(planted, run.model, run.params[3],
                           run.manifests[2], overwrite=True)
  report = verify_lib.verify(run.model.params, planted)
  (finding,) = report.problems
  assert (finding.kind, finding.tensor, finding.layer, finding.rank) == (
      "unexplained", DOWN.format(2), 2, 1)
  third = run.infos[2].records[0].touched[0].factors
  np.testing.assert_allclose(finding.norm, np.linalg.norm(
      third[0].astype(np.float64) @ third[1]), rtol=1e-4)


def test_a_declared_edit_that_was_not_applied_is_reported(run):
  missing = str(run.tmp.mktemp("not_applied"))
  manifest_lib.save_edited(missing, run.model, run.params[2],
                           run.manifests[3], overwrite=True)
  report = verify_lib.verify(run.model.params, missing)
  (finding,) = report.problems
  assert (finding.kind, finding.tensor, finding.layer, finding.rank) == (
      "not_applied", DOWN.format(2), 2, 1)
  assert "[2]" in finding.message
  assert report.tensors[DOWN.format(2)] == "not_applied"


def test_a_modified_signed_manifest_or_deltas_file_fails_the_signature(run):
  changed = _copy(run, "changed")
  def retarget(data):
    data["operations"][0]["records"][0]["request"]["target_new"] = " Dutch"
  _rewrite_manifest(changed, retarget)
  report = verify_lib.verify(run.model.params, changed, key=KEY)
  assert report.signature == "failed"
  assert [f.kind for f in report.problems] == ["signature"]
  assert "HMAC" in report.problems[0].message
  assert verify_lib.verify(run.model.params, run.clean,
                           key=b"other").signature == "failed"
  deltas = _copy(run, "deltas")
  path = os.path.join(deltas, manifest_lib.DELTAS)
  data = bytearray(open(path, "rb").read())
  data[-1] ^= 0x01  # the last byte of the last array
  open(path, "wb").write(data)
  kinds = {f.kind for f in verify_lib.verify(
      run.model.params, deltas, key=KEY).problems}
  assert {"signature", "deltas_file", "delta"} <= kinds


def test_rollback_by_subtraction_declares_negated_factors(run):
  record = run.infos[0].records[0]
  (leaf,) = record.touched
  u, v = leaf.factors
  w = base.get_leaf(run.params[2], leaf.path)
  rolled = base.replace_leaves(run.params[2], {leaf.path: w - u @ v})
  manifest = run.manifests[2].with_rollback(record.id, run.params[2], rolled,
                                            "subtract")
  assert manifest.operations[-1].undoes == record.id
  directory = str(run.tmp.mktemp("rollback"))
  manifest_lib.save_edited(directory, run.model, rolled, manifest,
                           overwrite=True)
  report = verify_lib.verify(run.model.params, directory)
  assert report.ok, report.summary()
  with pytest.raises(errors.InputError, match="not in this manifest"):
    run.manifests[2].with_rollback("nope", run.params[2], rolled, "subtract")


def test_wrong_base_missing_manifest_and_other_version_are_clear_errors(run):
  with pytest.raises(errors.VerifyError, match="another base model"):
    verify_lib.verify(make_tiny_lm(seed=1).params, run.clean)
  bare = _copy(run, "bare")
  os.remove(os.path.join(bare, manifest_lib.MANIFEST))
  with pytest.raises(errors.VerifyError, match="no manifest.json"):
    verify_lib.verify(run.model.params, bare)
  future = _copy(run, "future")
  _rewrite_manifest(future, lambda d: d.update(format_version=2))
  with pytest.raises(errors.VerifyError, match="format_version=2"):
    verify_lib.verify(run.model.params, future)
  with pytest.raises(errors.VerifyError, match="format_version=2"):
    manifest_lib.load_manifest(future)


def test_grace_adapters_verify_and_an_undeclared_entry_is_reported(run):
  model = run.model
  editor = editors.get("grace", layer=2, eps_factor=0.05, steps=1, lr=0.5)
  params, _, info = editor.apply(model, model.params, REQUESTS[:2],
                                 editor.init(model))
  manifest = manifest_lib.Manifest.start(model).with_apply(
      editor, info, model.params, params)
  assert [(e.index, e.action) for e in manifest.operations[0].adapters] == [
      (0, "add"), (1, "add")]
  directory = str(run.tmp.mktemp("grace"))
  manifest_lib.save_edited(directory, model, params, manifest, key=KEY,
                           overwrite=True)
  report = verify_lib.verify(model.params, directory, key=KEY)
  assert report.ok, report.summary()
  name = manifest_lib.adapter_name("layer/2/mlp/value", 0, "grace")
  assert report.tensors[name] == "explained"
  assert any(n.startswith(name + "/") for n in manifest_lib.load_manifest(
      directory).after["tensors"])
  def drop_second_entry(data):
    op = data["operations"][0]
    op["adapters"] = [e for e in op["adapters"] if e["index"] != 1]
    op["records"] = op["records"][:1]
  _rewrite_manifest(directory, drop_second_entry)
  report = verify_lib.verify(model.params, directory)
  (finding,) = report.problems
  assert (finding.kind, finding.tensor, finding.layer) == (
      "unexplained", name, 2)
  assert "[1]" in finding.message


def test_launcher_prints_the_report_and_one_line_errors(run, capsys,
                                                        monkeypatch):
  from absl import flags
  from absl.testing import flagsaver
  from experiments import verify as launcher
  flags.FLAGS.mark_as_parsed()
  monkeypatch.setattr(launcher.common, "setup", lambda: None)
  base_dir = models.save(run.model, str(run.tmp.mktemp("base")),
                         overwrite=True)
  key_file = run.tmp.mktemp("key") / "signing.key"
  key_file.write_bytes(KEY + b"\n")
  out = run.tmp.mktemp("out") / "report.json"
  with flagsaver.flagsaver(base="hf:" + base_dir, edited=run.clean,
                           key_file=str(key_file), output_json=str(out)):
    launcher.main([])
  assert "OK" in capsys.readouterr().out
  assert json.loads(out.read_text())["ok"]
  bare = _copy(run, "launcher_bare")
  os.remove(os.path.join(bare, manifest_lib.MANIFEST))
  with flagsaver.flagsaver(base="hf:" + base_dir, edited=bare), (
      pytest.raises(SystemExit)) as exit_info:
    launcher.main([])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "VerifyError" in err
  assert "no manifest.json" in err
