"""The generic trainer: sharding, multi-process, resume, checkpoints, configs.

The mesh tests run `tests/train_worker.py` (the tiny MEND recipe) in
subprocesses with simulated CPU devices; the rest use a toy objective.
"""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from keditjax import errors, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "train_worker.py")
TINY = os.path.join(ROOT, "experiments", "configs", "mend_tiny_synthetic.py")


def _env(devices):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _worker(out, steps, model, devices, extra=()):
  return subprocess.Popen(
      [sys.executable, WORKER, str(out), str(steps), str(model), *extra],
      env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def _finish(proc, timeout=600):
  output, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, output[-3000:]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
  out = tmp_path_factory.mktemp("w1") / "report.json"
  _finish(_worker(out, 20, 1, 1))
  return json.loads(out.read_text())


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  out = tmp_path_factory.mktemp("w8") / "report.json"
  _finish(_worker(out, 20, 2, 8))
  return json.loads(out.read_text())


def test_eight_devices_equal_one_and_are_sharded(one_device_losses,
                                                 eight_devices):
  one, eight = one_device_losses, eight_devices
  assert one["devices"] == 1 and eight["devices"] == 8
  assert eight["mesh"] == {"data": 4, "model": 2}
  assert len(one["losses"]) == len(eight["losses"]) == 20
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-4)
  # The hypernetwork is split over "model": each device holds half of w1.
  assert eight["w1"] == ["None", "model"] and eight["w2"] == ["model", "None"]
  assert eight["mu_w1"] == ["None", "model"]  # Adam's moments follow
  assert eight["w1_shard_shape"][1] * 2 == eight["w1_shape"][1]
  assert len(set(np.round(one["losses"], 3))) > 5  # it is really training


def test_two_processes_equal_one_process(eight_devices, tmp_path):
  """2 processes x 4 devices joined by jax.distributed == 1 x 8."""
  out = tmp_path / "report.json"
  coordinator = f"localhost:{_free_port()}"
  procs = [_worker(out, 20, 2, 4, (coordinator, "2", str(i)))
           for i in range(2)]
  for proc in procs:
    _finish(proc)
  two = json.loads(out.read_text())
  assert two["processes"] == 2 and two["devices"] == 8
  assert two["mesh"] == {"data": 4, "model": 2}
  assert two["w1"] == ["None", "model"]
  np.testing.assert_allclose(two["losses"], eight_devices["losses"],
                             rtol=1e-4)


def _launch(workdir, *flags):
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.train_hypernet", f"--config={TINY}",
       f"--workdir={workdir}", "--config.train.progress=False", *flags],
      cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def _editor_net(workdir):
  from keditjax.editors import mend
  from keditjax.models import tiny
  net, _, meta = mend.load(str(workdir), tiny.tiny_lm().config)
  return jax.tree.map(np.asarray, net), meta


def test_kill_and_resume_equals_uninterrupted(tmp_path):
  flags = ("--config.train.steps=30", "--config.train.checkpoint_every=5",
           "--config.train.log_every=1", "--config.train.eval_every=10")
  straight = tmp_path / "straight"
  _finish(_launch(straight, *flags))
  killed = tmp_path / "killed"
  proc = _launch(killed, *flags)
  metrics = killed / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline:  # SIGKILL once step 12 has been logged
    if metrics.exists() and '"step": 12,' in metrics.read_text():
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  steps = training.Checkpointer(str(killed / "checkpoints"), every=5,
                                keep=3).all_steps()
  assert steps and max(steps) < 30, steps  # it really died midway
  _finish(_launch(killed, *flags))
  result = json.loads((killed / "result.json").read_text())
  assert result["resumed_from"] == max(steps)
  a, meta_a = _editor_net(straight)
  b, meta_b = _editor_net(killed)
  assert meta_a["best_step"] == meta_b["best_step"]
  for key in a:
    np.testing.assert_allclose(b[key], a[key], atol=1e-6, rtol=0)
  logged = [json.loads(l)["step"] for l in metrics.read_text().splitlines()
            if '"train"' in l]
  assert logged == list(range(1, 31))  # each step logged once


# -- a toy objective, in process -------------------------------------------

W_TRUE = np.random.RandomState(0).randn(16, 8).astype(np.float32)


def _toy(fingerprint="toy-1", shape=(16, 8), name="toy"):
  def init(rng):
    return {"w": jax.random.normal(rng, shape) * 0.1,
            "b": jnp.zeros(shape[1:])}

  def loss(params, frozen, batch, rng):
    del rng
    pred = batch["x"] @ params["w"][:16, :8] + params["b"][:8] + frozen["c"]
    mse = jnp.mean((pred - batch["y"]) ** 2)
    return mse, {"mse": mse}
  return training.Objective(name, init, loss,
                            frozen={"c": np.zeros(8, np.float32)},
                            param_rules=((r"^w$", P(None, "model")),),
                            fingerprint=fingerprint)


def _batch(step):
  x = np.random.RandomState(step).randn(8, 16).astype(np.float32)
  return {"x": x, "y": x @ W_TRUE}


def _config(**kw):
  c = training.default_config()
  c.update(dict(steps=20, learning_rate=3e-2, log_every=1, eval_every=5,
                checkpoint_every=4, progress=False, tensorboard=False), **kw)
  return c


class _Stop(Exception):
  pass


def _stop_at(k):
  def hook(step, metrics):
    del metrics
    if step == k:
      raise _Stop()
  return hook


def test_resume_in_process_is_exact_and_early_stopping_resumes(tmp_path):
  valid = [_batch(10_000)]
  ref = training.train(_toy(), _config(), batch_fn=_batch,
                       valid_batches=valid, workdir=str(tmp_path / "a"))
  with pytest.raises(_Stop):
    training.train(_toy(), _config(), batch_fn=_batch, valid_batches=valid,
                   workdir=str(tmp_path / "b"), on_step=_stop_at(11))
  res = training.train(_toy(), _config(), batch_fn=_batch,
                       valid_batches=valid, workdir=str(tmp_path / "b"))
  assert res.resumed_from == 8
  assert res.best_step == ref.best_step
  for key in ref.params:
    np.testing.assert_allclose(res.params[key], ref.params[key], atol=1e-6)
  assert ref.history[-1]["loss"] < ref.history[0]["loss"] / 2


def test_early_stopping_keeps_the_best_params(tmp_path):
  # A learning rate that diverges: validation gets worse after the start.
  c = _config(learning_rate=0.5, patience=2, eval_every=2, steps=40)
  res = training.train(_toy(), c, batch_fn=_batch,
                       valid_batches=[_batch(10_000)])
  valid = [r for r in res.history if r["split"] == "valid"]
  assert res.stopped_early and res.steps < 40
  best = min(valid, key=lambda r: r["loss"])
  assert res.best_step == best["step"]
  assert len(valid) == [r["step"] for r in valid].index(best["step"]) + 3


def test_checkpoint_of_another_model_is_refused(tmp_path):
  training.train(_toy(), _config(steps=4), batch_fn=_batch,
                 workdir=str(tmp_path))
  with pytest.raises(errors.CheckpointError, match="fingerprint"):
    training.train(_toy(fingerprint="toy-2"), _config(steps=8),
                   batch_fn=_batch, workdir=str(tmp_path))
  with pytest.raises(errors.CheckpointError, match="name"):
    training.train(_toy(name="other"), _config(steps=8), batch_fn=_batch,
                   workdir=str(tmp_path))


def test_corrupt_checkpoint_is_a_keditjax_error(tmp_path):
  training.train(_toy(), _config(steps=8), batch_fn=_batch,
                 workdir=str(tmp_path))
  step_dir = tmp_path / "checkpoints" / "8"
  files = [f for f in glob.glob(str(step_dir / "state" / "**"),
                                recursive=True) if os.path.isfile(f)]
  assert files
  for f in files:  # garble every array and metadata file of the step
    with open(f, "r+b") as fh:
      fh.write(b"\x00garbage\xff" * 4)
  with pytest.raises(errors.CheckpointError, match="step 8"):
    training.train(_toy(), _config(steps=12), batch_fn=_batch,
                   workdir=str(tmp_path))
  shutil.rmtree(step_dir / "meta")
  with pytest.raises(errors.CheckpointError, match="step 8"):
    training.train(_toy(), _config(steps=12), batch_fn=_batch,
                   workdir=str(tmp_path))


def test_crash_mid_save_never_leaves_an_unreadable_latest(tmp_path):
  """SIGKILL a run that saves a 32 MB state every step, many times."""
  script = f"""
import sys
sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
import test_training as t
c = t._config(steps=10_000, checkpoint_every=1, keep=2, eval_every=10_000)
t.training.train(t._toy(shape=(2048, 4096)), c, batch_fn=t._batch,
                 workdir={str(tmp_path)!r})
"""
  root = tmp_path / "checkpoints"
  listing = lambda: os.listdir(root) if root.exists() else []
  tmps = lambda: {n for n in listing() if "tmp" in n}
  # A save can finish between seeing its tmp directory and the kill landing,
  # so attempts repeat until 3 kills have cut a save short (a new tmp dir
  # left behind); after every kill the latest step must be readable.
  cut = attempts = 0
  while cut < 3 and attempts < 20:
    attempts += 1
    before = tmps()  # leftovers of the last kill (the next run cleans them)
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(1),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Kill the moment a save is under way after at least one finished step.
    while time.time() < deadline and not (
        tmps() - before and any(n.isdigit() for n in listing())):
      time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert time.time() < deadline, "no save started within 300 s"
    cut += bool(tmps() - before)  # this save was cut short
    ckpt = training.Checkpointer(str(root), every=1, keep=2)
    latest = ckpt.latest_step()
    assert latest is not None
    assert ckpt.read_meta(latest)["name"] == "toy"  # readable
    ckpt.close()
  assert cut == 3, f"only {cut} of {attempts} kills landed mid-save"
  # ... and training resumes from the newest finished step, arrays and all.
  res = training.train(_toy(shape=(2048, 4096)),
                       _config(steps=latest + 1, checkpoint_every=1, keep=2,
                               eval_every=10_000),
                       batch_fn=_batch, workdir=str(tmp_path))
  assert res.resumed_from == latest and res.steps == latest + 1


def test_unknown_config_fields_are_refused(tmp_path):
  from keditjax.evaluation import hypernet
  c = hypernet.mend_config()
  c.train.stpes = 3
  with pytest.raises(errors.UnsupportedConfigError, match="stpes"):
    hypernet.check(c)
  c = hypernet.mend_config()
  c.mend.rnak = 3
  with pytest.raises(errors.UnsupportedConfigError, match="rnak"):
    hypernet.check(c)
  for method in ("knowledge_editor", "mend_classifier", "enn"):
    c = hypernet.defaults(method)
    hypernet.check(c)  # the defaults themselves pass
    c.batch_sise = 3
    with pytest.raises(errors.UnsupportedConfigError, match="batch_sise"):
      hypernet.check(c)
  c = hypernet.defaults("knowledge_editor")
  c.editor.hiden = 64
  with pytest.raises(errors.UnsupportedConfigError, match="hiden"):
    hypernet.check(c)
  with pytest.raises(errors.ConfigError, match="optimizer"):
    training.train(_toy(), _config(optimizer="adagrad"), batch_fn=_batch)
  # A config file with an unknown field, through the launcher.
  bad = tmp_path / "bad_config.py"
  bad.write_text("from experiments.configs import mend_tiny_synthetic\n"
                 "def get_config():\n"
                 "  c = mend_tiny_synthetic.get_config()\n"
                 "  c.learning_rte = 1.0\n  return c\n")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train_hypernet",
       f"--config={bad}", f"--workdir={tmp_path / 'w'}"], cwd=ROOT,
      env=_env(1), capture_output=True, text=True)
  assert proc.returncode != 0
  assert "UnsupportedConfigError" in proc.stderr and "learning_rte" in proc.stderr
  assert not (tmp_path / "w").exists()  # refused before any work
  # An unknown command-line override is refused by the locked config.
  proc = _launch(tmp_path / "w2", "--config.train.stepz=3")
  output, _ = proc.communicate()
  assert proc.returncode != 0 and "stepz" in output
