"""Progress bars: a terminal bar on a TTY, a few whole lines in a log."""

import io
import sys

from keditjax import progress


def _run_bar(monkeypatch, setting, n=2000, **kwargs):
  stream = io.StringIO()  # not a TTY, like a log file
  monkeypatch.setattr(sys, "stderr", stream)
  if setting is None:
    monkeypatch.delenv("KEDITJAX_PROGRESS", raising=False)
  else:
    monkeypatch.setenv("KEDITJAX_PROGRESS", setting)
  total = 0
  for i in progress.bar(range(n), desc="work", **kwargs):
    total += i
  assert total == n * (n - 1) // 2  # every item still comes through
  return stream.getvalue()


def test_a_log_gets_a_few_whole_lines_not_a_flood(monkeypatch):
  assert progress.mode() in ("log", "tty")
  text = _run_bar(monkeypatch, None)
  lines = text.splitlines()
  assert "\r" not in text and text.endswith("\n")
  assert 1 <= len(lines) <= 3, lines  # start (+ maybe one) + the final line
  assert "2000/2000" in lines[-1] and lines[-1].startswith("work")


def test_progress_off_and_forced_log(monkeypatch):
  assert _run_bar(monkeypatch, "0") == ""
  assert "2000/2000" in _run_bar(monkeypatch, "log")
  monkeypatch.setenv("KEDITJAX_PROGRESS", "1")
  assert progress.mode() == "tty"
  monkeypatch.setenv("KEDITJAX_PROGRESS", "0")
  assert progress.mode() == "off"


def test_trange_and_an_explicit_disable(monkeypatch):
  text = _run_bar(monkeypatch, "log", disable=True)
  assert text == ""
  stream = io.StringIO()
  monkeypatch.setattr(sys, "stderr", stream)
  assert sum(progress.trange(5, desc="t")) == 10
  assert "5/5" in stream.getvalue()


def test_postfix_updates_do_not_flood_a_log(monkeypatch):
  """The harness sets a postfix every step; in a log that must not print a
  line per step (tqdm redraws on every set_postfix by default)."""
  stream = io.StringIO()
  monkeypatch.setattr(sys, "stderr", stream)
  monkeypatch.setenv("KEDITJAX_PROGRESS", "log")
  bar = progress.bar(range(500), desc="edits")
  for i in bar:
    bar.set_postfix(sr=i)
    bar.set_description(f"edits {i % 3}")
  bar.close()
  lines = stream.getvalue().splitlines()
  assert 1 <= len(lines) <= 3, lines
  assert "sr=499" in lines[-1]
