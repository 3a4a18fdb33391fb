"""`KEY=VALUE` overrides of a spec on the command line, applied to the parsed YAML before it is validated.

    python -m orchestrator.sweep sweeps/smoke.yaml workload.recipe.epochs=2 grid.seed=[0,1,2]

KEY is a dotted path into the YAML document (`grid[1].seed` names an entry of a list-form grid); VALUE is read as
YAML (`2` is an integer, `[0, 1]` a list, `bn` a string, `'1'` the string "1"). The overridden document then goes
through exactly the validation a YAML file goes through, so a bad value gets the same one-line message naming the
field, and the spec stored with the sweep (`spec.yaml`) is the one with the overrides applied. Missing mappings on
the way are created, so an override can set a field the file leaves at its default.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import yaml

_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_*-]*)((?:\[\d+\])*)")


class OverrideError(ValueError):
    """An override that is not KEY=VALUE, or whose KEY cannot be followed through the document."""


def _parse_key(key: str, override: str) -> list[str | int]:
    steps: list[str | int] = []
    for part in key.split("."):
        match = _SEGMENT.fullmatch(part)
        if not match:
            raise OverrideError(f"override {override!r}: {part!r} is not a field name (letters, digits, '_', [index])")
        steps.append(match.group(1))
        steps += [int(i) for i in re.findall(r"\[(\d+)\]", match.group(2))]
    return steps


def _parse_value(text: str, override: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise OverrideError(f"override {override!r}: the value is not valid YAML ({problem})") from None


def _shown(steps: list[str | int]) -> str:
    text = ""
    for step in steps:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`data` (a parsed spec document) with each override applied in order; `data` itself is not changed."""
    result: dict[str, Any] = yaml.safe_load(yaml.safe_dump(data)) if overrides else data  # a deep copy
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise OverrideError(f"override {override!r}: expected KEY=VALUE, e.g. workload.recipe.epochs=2")
        steps = _parse_key(key.strip(), override)
        value = _parse_value(text, override)
        node: Any = result
        for depth, step in enumerate(steps[:-1]):
            following = steps[depth + 1]
            if isinstance(step, int):
                if not isinstance(node, list) or step >= len(node):
                    size = len(node) if isinstance(node, list) else 0
                    raise OverrideError(
                        f"override {override!r}: {_shown(steps[: depth + 1])} does not exist ({size} entries)"
                    )
                node = node[step]
                continue
            if not isinstance(node, dict):
                raise OverrideError(f"override {override!r}: {_shown(steps[:depth])} is not a mapping")
            if step == "grid" and isinstance(node.get(step), list) and not isinstance(following, int):
                raise OverrideError(
                    f"override {override!r}: the grid is a list of {len(node[step])} entries; name one, "
                    f"e.g. grid[0].{following}=..."
                )
            if node.get(step) is None:
                node[step] = {}
            node = node[step]
        last = steps[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise OverrideError(f"override {override!r}: {_shown(steps)} does not exist")
            node[last] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise OverrideError(f"override {override!r}: {_shown(steps[:-1])} is not a mapping")
    return result
