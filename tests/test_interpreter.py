"""The driver names its interpreter and what it lacks in one line (orchestrator.interpreter), instead of a traceback.

The case it is for: `ray start --head` in a shell without the project's virtual environment, then `ray job submit`
of the README's command; the job runs on the head's Python, which lacks the project's packages. Here that
interpreter is simulated by hiding packages from this one (a None entry in sys.modules makes both find_spec and
import report the module as absent).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator import interpreter

ROOT = Path(__file__).resolve().parents[1]


def test_this_interpreter_has_everything() -> None:
    assert interpreter.missing_packages() == []


def test_missing_packages_by_their_pip_names(monkeypatch: Any) -> None:
    for module in ("fsspec", "s3fs", "yaml"):
        monkeypatch.setitem(sys.modules, module, None)
    assert interpreter.missing_packages() == ["PyYAML", "fsspec", "s3fs"]


def test_check_exits_2_with_one_line(monkeypatch: Any, capsys: Any) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(SystemExit) as exit_info:
        interpreter.check_interpreter()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: this driver runs on {sys.executable} (Python ")
    assert "which lacks fsspec:" in err and "ray start --head" in err and ".venv" in err


def test_message_names_interpreter_version_and_packages() -> None:
    line = interpreter.describe_missing(["fsspec", "s3fs"], "/usr/bin/python3", "3.11.2")
    assert line.startswith("error: this driver runs on /usr/bin/python3 (Python 3.11.2), which lacks fsspec, s3fs: ")


def test_sweep_driver_refuses_before_its_first_import() -> None:
    """`python -m orchestrator.sweep` on an interpreter without fsspec and s3fs: exit status 2 and one line, where it
    used to end in `ModuleNotFoundError: No module named 'fsspec'`."""
    hide = (
        "import runpy, sys; sys.modules['fsspec'] = None; sys.modules['s3fs'] = None; "
        "sys.argv = ['orchestrator.sweep', 'sweeps/tiny.yaml', '--plan']; "
        "runpy.run_module('orchestrator.sweep', run_name='__main__', alter_sys=True)"
    )
    proc = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "which lacks fsspec, s3fs" in proc.stderr and proc.stdout == ""


def test_importing_the_sweep_module_checks_nothing(monkeypatch: Any) -> None:
    """Only the driver (`python -m orchestrator.sweep`) checks; a module that imports it is not ended by it."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['s3fs'] = None; import orchestrator.sweep; print('ok')"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
