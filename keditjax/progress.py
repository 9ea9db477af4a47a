"""Progress bars that do not flood non-interactive logs.

Every long loop in keditjax shows progress through `bar` / `trange`:

  - on a terminal or in a notebook: an ordinary tqdm bar (`tqdm.auto`);
  - otherwise (a log file, CI, `nohup`): at most one plain line every
    `LOG_INTERVAL_S` seconds (and the final one), each ending in a newline,
    instead of a carriage-return update several times a second;
  - `KEDITJAX_PROGRESS=0` turns every bar off, `=1` forces terminal bars,
    `=log` forces the log lines.
"""

from __future__ import annotations

import os
import sys

LOG_INTERVAL_S = 30.0


def mode() -> str:
  """"off", "tty" or "log": how bars are shown in this process."""
  setting = os.environ.get("KEDITJAX_PROGRESS", "").strip().lower()
  if setting in ("0", "off", "false", "no"):
    return "off"
  if setting in ("1", "tty", "on", "true", "yes"):
    return "tty"
  if setting == "log":
    return "log"
  if "ipykernel" in sys.modules:  # Jupyter/Colab: tqdm.auto draws a widget
    return "tty"
  stream = sys.stderr
  return "tty" if getattr(stream, "isatty", lambda: False)() else "log"


class _Lines:
  """A stream that turns tqdm's carriage-return updates into whole lines."""

  def __init__(self, stream):
    self.stream = stream
    self.at_line_start = True

  def write(self, text: str) -> int:
    out = []
    for ch in text.replace("\r", "\n"):
      if ch == "\n":
        if self.at_line_start:  # no blank lines
          continue
        self.at_line_start = True
      else:
        self.at_line_start = False
      out.append(ch)
    if out:
      self.stream.write("".join(out))
    return len(text)

  def flush(self) -> None:
    self.stream.flush()


def bar(iterable=None, *, disable: bool = False, **kwargs):
  """A tqdm bar (same arguments) shown as this process's `mode()` says."""
  how = mode()
  if how == "tty":
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(iterable, disable=disable, **kwargs)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  if how == "off":
    disable = True
  kwargs.setdefault("mininterval", LOG_INTERVAL_S)
  kwargs.setdefault("maxinterval", max(LOG_INTERVAL_S, kwargs["mininterval"]))
  kwargs.setdefault("file", _Lines(sys.stderr))
  kwargs.setdefault("ncols", 100)
  kwargs.setdefault("dynamic_ncols", False)
  return _log_class(tqdm)(iterable, disable=disable, **kwargs)


def _log_class(tqdm):
  """tqdm whose postfix/description updates wait for the next timed line
  (tqdm redraws on every `set_postfix` by default, a line per step in a log)."""

  class LogTqdm(tqdm):  # pylint: disable=invalid-name

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
      del refresh
      super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc=None, refresh=False):
      del refresh
      super().set_description(desc, refresh=False)

  return LogTqdm


def trange(n: int, **kwargs):
  """`bar(range(n), ...)`."""
  return bar(range(n), **kwargs)


def write(message: str) -> None:
  """Prints a line without breaking an active bar."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  tqdm.write(message)
