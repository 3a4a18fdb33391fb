"""Refuse to run the sweep's driver on a Python that lacks its packages, in one line instead of a traceback.

`ray job submit` runs the driver with the `python` of the Ray head, not with the one the command was typed in: a
head started by `ray start --head` in a shell without the project's virtual environment runs the job on another
interpreter, where the first third-party import fails deep inside the project. `check_interpreter` looks for every
package first (importlib.util.find_spec, nothing is imported) and names the interpreter, what it lacks and the fix.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from collections.abc import Sequence

# Import name -> the name pip installs it by. The driver's own imports, plus what its cells import: on a cluster
# of one node (`ray start --head` on a laptop) the Train workers run on this same interpreter.
REQUIRED = {
    "ray": "ray",
    "yaml": "PyYAML",
    "pydantic": "pydantic",
    "numpy": "numpy",
    "pyarrow": "pyarrow",
    "fsspec": "fsspec",
    "s3fs": "s3fs",
    "matplotlib": "matplotlib",
    "sklearn": "scikit-learn",
    "torch": "torch",
}
EXIT_MISSING = 2  # the sweep's status for a run that cannot start (README, "Command line")


def missing_packages(required: dict[str, str] = REQUIRED) -> list[str]:
    """The pip names of the required packages this interpreter cannot import, in `required`'s order."""
    missing = []
    for module, package in required.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken installation, or a module object without a spec
            found = False
        if not found:
            missing.append(package)
    return missing


def describe_missing(missing: Sequence[str], executable: str | None = None, version: str | None = None) -> str:
    executable = executable or sys.executable or "python"
    version = version or platform.python_version()
    return (
        f"error: this driver runs on {executable} (Python {version}), which lacks {', '.join(missing)}: "
        "`ray job submit` runs jobs with the Python of the Ray head, so start the head from the project's "
        "environment (ray stop; source .venv/bin/activate; ray start --head) or install the project there "
        "(pip install -e .)"
    )


def check_interpreter(required: dict[str, str] = REQUIRED) -> None:
    """Exit with status 2 and one line on standard error if this interpreter lacks a required package."""
    missing = missing_packages(required)
    if missing:
        print(describe_missing(missing), file=sys.stderr)
        raise SystemExit(EXIT_MISSING)
