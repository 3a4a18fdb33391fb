"""The spec parser survives arbitrary input: every document either validates or raises SpecError with a message.

Property-based (hypothesis): random YAML text, random YAML-shaped values, and mutations of a valid spec. A crash
here would be a traceback (or a hang) in front of a user who made a typo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.spec import Spec, SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[1]
VALID = yaml.safe_load((ROOT / "sweeps" / "tiny.yaml").read_text())
FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
yaml_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20,
)


def _parses_or_explains(text: str) -> Spec | None:
    try:
        return parse_spec(text, "fuzz.yaml")
    except SpecError as err:
        message = str(err)
        assert message.strip(), "a SpecError must say what is wrong"
        assert "Traceback" not in message
        return None


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    _parses_or_explains(text)


@FUZZ
@given(yaml_values)
def test_arbitrary_yaml_values(value: Any) -> None:
    _parses_or_explains(yaml.safe_dump(value))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, child in node.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            out += _paths(child, (*prefix, index))
    return out


PATHS = _paths(VALID)[1:]


@FUZZ
@given(st.sampled_from(PATHS), yaml_values)
def test_valid_spec_with_one_value_replaced(path: tuple[Any, ...], value: Any) -> None:
    document = yaml.safe_load(yaml.safe_dump(VALID))
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _parses_or_explains(yaml.safe_dump(document))


@FUZZ
@given(st.sampled_from(PATHS), st.text(min_size=1, max_size=12), yaml_values)
def test_valid_spec_with_a_key_added(path: tuple[Any, ...], key: str, value: Any) -> None:
    document = yaml.safe_load(yaml.safe_dump(VALID))
    node = document
    for step in path[:-1]:
        node = node[step]
    target = node[path[-1]]
    if isinstance(target, dict):
        target[key] = value
    else:
        node[path[-1]] = {key: value}
    _parses_or_explains(yaml.safe_dump(document))


def test_the_unmutated_spec_is_valid() -> None:
    assert _parses_or_explains(yaml.safe_dump(VALID)) is not None  # the mutations start from a valid spec
