"""semray.logs: library output goes to the log file, semray's own lines and errors reach the terminal.

Each case runs a small script in a fresh Python process whose stdout/stderr are real descriptors (pipes),
as in a shell, since the quiet mode redirects descriptors 1 and 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from semray import logs

BODY = """
import logging, os, sys, warnings
from semray import logs
with logs.quiet("unit", verbose={verbose}) as path:
    print("library print")
    os.write(2, b"C-level stderr line\\n")
    logging.getLogger("lib").warning("library warning record")
    warnings.warn("a deprecation notice", DeprecationWarning, stacklevel=1)
    with logs.stage("stage one"):
        bar = logs.progress_bar(3, "items", "item")
        for _ in range(3):
            bar.update(1)
        bar.close()
    logs.say("the result line")
    if {fail}:
        raise RuntimeError("something broke")
print("after", path)
"""


def _run(tmp_path: Path, verbose: bool = False, fail: bool = False) -> subprocess.CompletedProcess:
    code = textwrap.dedent(BODY.format(verbose=verbose, fail=fail))
    env = {**os.environ, "SEMRAY_HOME": str(tmp_path), "PYTHONWARNINGS": "always"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def _log_file(tmp_path: Path) -> Path:
    (log,) = (tmp_path / "logs").glob("unit-*.log")
    return log


def test_quiet_sends_library_output_to_the_log_and_keeps_semray_lines(tmp_path: Path) -> None:
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr
    log = _log_file(tmp_path)
    terminal = r.stdout + r.stderr
    for line in ("library print", "C-level stderr line", "library warning record", "a deprecation notice"):
        assert line not in terminal
        assert line in log.read_text()
    assert f"messages go to {log}" in r.stdout.splitlines()[0]
    assert "the result line" in r.stdout
    assert "stage one" in r.stderr and "3/3" in r.stderr and "done in" in r.stderr  # one bar, counted
    assert r.stdout.splitlines()[-1] == f"after {log}"  # the terminal is back after the block


def test_an_error_is_shown_in_full_and_names_the_log(tmp_path: Path) -> None:
    r = _run(tmp_path, fail=True)
    assert r.returncode == 1
    log = _log_file(tmp_path)
    assert "Traceback" in r.stderr and "RuntimeError: something broke" in r.stderr
    assert f"failed; Ray and library messages are in {log}" in r.stderr
    assert "library print" not in r.stdout + r.stderr


def test_verbose_changes_nothing(tmp_path: Path) -> None:
    r = _run(tmp_path, verbose=True)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "logs").exists()
    assert "library print" in r.stdout and "C-level stderr line" in r.stderr
    assert "library warning record" in r.stderr and "a deprecation notice" in r.stderr
    assert r.stdout.splitlines()[-1] == "after None"


def test_outside_quiet_the_console_is_the_current_streams(capsys: pytest.CaptureFixture[str]) -> None:
    logs.say("hello")
    assert capsys.readouterr().out == "hello\n"
    assert logs.out() is sys.stdout and logs.err() is sys.stderr


def test_quiet_under_replaced_streams_writes_the_log_and_keeps_the_caller_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SEMRAY_HOME", str(tmp_path))
    with logs.quiet("unit") as path:
        print("library print")
        logs.say("result")
    assert path is not None and "library print" in path.read_text()
    out = capsys.readouterr().out
    assert "result" in out and "library print" not in out
