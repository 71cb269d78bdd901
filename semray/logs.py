"""Quiet, readable command output: semray's own progress and results on the terminal, everything else
in a log file.

A command runs inside :func:`quiet`: Ray's worker output (streamed to the driver), Ray's, MLflow's and
other libraries' log records and Python warnings go to ``$SEMRAY_HOME/logs/<command>-<time>.log``, whose
path is printed first; the command prints through :func:`say` and shows progress with :func:`stage`
(one bar per stage) and :func:`progress_bar`, which write to the terminal. ``--verbose`` (``verbose=True``)
changes nothing: everything is shown as before. An error still reaches the terminal in full: the context
restores the terminal before the exception leaves it, and names the log file.

How: when the process's stdout and stderr are the real file descriptors 1 and 2 (a shell, ``make``),
both are pointed at the log file with ``dup2``, so the C++ core's messages and Ray's log-streaming thread
land there too; the terminal stays reachable through duplicates of the original descriptors. Otherwise
(stdout replaced by a caller, e.g. pytest's ``capsys``) ``sys.stdout`` and ``sys.stderr`` are swapped
for the log file and the console is the caller's streams. ``RAY_DATA_DISABLE_PROGRESS_BARS`` is set for
the duration (a local Ray's workers inherit it), so Ray Data's bars do not fill the log.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

#: The terminal while :func:`quiet` is active: ``(stdout, stderr)``; ``None`` outside it.
_console: tuple[IO[str], IO[str]] | None = None
#: The stage bar :func:`stage` shows now; inner :func:`progress_bar` calls count into it.
_stage: Any = None


def out() -> IO[str]:
    """Where results go: the terminal's stdout (also inside :func:`quiet`)."""
    return _console[0] if _console is not None else sys.stdout


def err() -> IO[str]:
    """Where progress bars go: the terminal's stderr (also inside :func:`quiet`)."""
    return _console[1] if _console is not None else sys.stderr


def say(*parts: object) -> None:
    """``print`` to the terminal (:func:`out`), flushed."""
    print(*parts, file=out(), flush=True)


def log_path(command: str) -> Path:
    """A fresh log file path ``$SEMRAY_HOME/logs/<command>-<UTC time>-<pid>.log`` (folder created)."""
    from semray.tracking import semray_home

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = semray_home() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{command}-{stamp}-{os.getpid()}.log"


def _real_fds() -> bool:
    """True when sys.stdout/sys.stderr write to descriptors 1 and 2 (not replaced by a caller)."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.StringIO, pytest's capture, a closed stream
        return False


@contextmanager
def _redirected(log: IO[str]) -> Iterator[tuple[IO[str], IO[str]]]:
    """Point stdout and stderr at ``log``; yields the console ``(stdout, stderr)``; restores on exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    if not _real_fds():
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = log
        try:
            yield saved
        finally:
            sys.stdout, sys.stderr = saved
        return
    fd_out, fd_err = os.dup(1), os.dup(2)
    console = os.fdopen(fd_out, "w", buffering=1), os.fdopen(fd_err, "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd_out, 1)
        os.dup2(fd_err, 2)
        for c in console:
            c.close()


def _ray_running() -> bool:
    """Whether this process is connected to Ray (without importing Ray when nothing has)."""
    return "ray" in sys.modules and bool(sys.modules["ray"].is_initialized())


@contextmanager
def quiet(command: str, verbose: bool = False) -> Iterator[Path | None]:
    """Run a command's body with library output in a log file (see module docstring).

    Args:
        command: the command's name (``"train"``), used in the file name and messages.
        verbose: show everything on the terminal as before; no log file.

    Yields:
        The log file's path, or ``None`` when ``verbose`` (or when already inside :func:`quiet`).
    """
    global _console
    if verbose or _console is not None:
        yield None
        return
    path = log_path(command)
    say(f"semray {command}: Ray and library messages go to {path} (--verbose shows them here)")
    had_ray = _ray_running()
    env_before = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    with open(path, "a", buffering=1, encoding="utf-8") as log, _redirected(log) as console:
        _console = console
        try:
            yield path
            if not had_ray and _ray_running():
                import ray

                ray.shutdown()  # inside: its goodbye messages and last streamed worker lines go to the log
        except BaseException:
            print(f"semray {command}: failed; Ray and library messages are in {path}", file=console[1])
            raise
        finally:
            _console = None
            if env_before is None:
                os.environ.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)


class _Stage:
    """One terminal bar for one stage: elapsed time (refreshed each second on a terminal), and a count
    once something inside reports a total through :func:`progress_bar`."""

    def __init__(self, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, total=None, file=err(), unit="", bar_format="{desc}: {elapsed}{postfix}")
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if getattr(err(), "isatty", lambda: False)():
            self._ticker = threading.Thread(target=self._tick, daemon=True, name="semray-stage-bar")
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.bar.refresh()

    def counting(self, total: int | None, unit: str) -> Any:
        """Switch the bar to counting ``total`` items of ``unit``; returns it."""
        self.bar.unit = unit
        self.bar.bar_format = None if total else "{desc}: {n_fmt} {unit} [{elapsed}{postfix}]"
        self.bar.reset(total=total)
        return self.bar

    def close(self, postfix: str) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.close()


@contextmanager
def stage(desc: str) -> Iterator[None]:
    """Show one bar for the stage ``desc`` while its body runs; it ends with ``done`` or ``failed``."""
    global _stage
    outer, t0 = _stage, time.perf_counter()
    _stage = _Stage(desc)
    try:
        yield
    except BaseException:
        _stage.close("failed")
        raise
    else:
        _stage.close(f"done in {time.perf_counter() - t0:.0f} s")
    finally:
        _stage = outer


class _NoClose:
    """A stage's bar lent to an inner loop: the loop's ``close()`` leaves the stage's bar open."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)

    def close(self) -> None:
        self._bar.refresh()


def progress_bar(total: int | None, desc: str, unit: str = "it", disable: bool = False) -> Any:
    """A tqdm bar on the terminal; inside :func:`stage`, that stage's own bar (now counting ``total``).

    The caller uses it as a tqdm (``update``, ``set_postfix_str``, ``close``).
    """
    from tqdm.auto import tqdm  # a widget in a notebook, text on a terminal

    if _stage is not None and not disable:
        return _NoClose(_stage.counting(total, unit))
    where = {} if _console is None else {"file": err()}
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, **where)
