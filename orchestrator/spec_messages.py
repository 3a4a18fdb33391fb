"""The spec's one-line messages: SpecError, values shown the way a researcher writes them, and pydantic's
validation errors turned into lines that name the field path, the bad value and what is allowed."""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Callable
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


class SpecError(Exception):
    """An invalid spec or argument. `message` is what the CLI prints before exiting with status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def show_number(value: float) -> str:
    """1.0 -> '1', 0.25 -> '0.25': bounds and values printed the way a researcher writes them."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def show_value(value: Any) -> str:
    """A short, YAML-flavoured rendering of a user value for messages (containers are not expanded)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return show_number(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for seg in loc:
        if isinstance(seg, int):
            out += f"[{seg}]"
        else:
            text = str(seg) if re.fullmatch(r"[A-Za-z0-9_*-]+", str(seg)) else repr(str(seg))
            out += f".{text}" if out else text
    return out


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _walk_fields(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The model that holds the last key of `loc` and that key's FieldInfo (None where unknown)."""
    cls: type[BaseModel] | None = root
    info: FieldInfo | None = None
    for i, seg in enumerate(loc):
        if isinstance(seg, int):
            continue
        if cls is None or seg not in cls.model_fields:
            return (cls if i == len(loc) - 1 else None), None
        info = cls.model_fields[seg]
        if i < len(loc) - 1:
            cls = _model_in(info.annotation)
    return cls, info


def _allowed_range(info: FieldInfo | None, ctx: dict[str, Any]) -> str:
    bounds: dict[str, Any] = {}
    for meta in info.metadata if info is not None else []:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(meta, name, None) is not None:
                bounds[name] = getattr(meta, name)
    bounds.update({k: v for k, v in ctx.items() if k in ("ge", "gt", "le", "lt")})
    lo = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    hi = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if lo and hi:
        return f"{lo[0]}{show_number(lo[1])}, {show_number(hi[1])}{hi[0]}"
    if lo:
        return f"(must be {'>=' if lo[0] == '[' else '>'} {show_number(lo[1])})"
    if hi:
        return f"(must be {'<=' if hi[0] == ']' else '<'} {show_number(hi[1])})"
    return ""


def _annotation_name(info: FieldInfo | None) -> str:
    if info is None:
        return ""
    annotation = info.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next((a for a in get_args(annotation) if a is not type(None)), annotation)
    return getattr(annotation, "__name__", "")


def _error_line(error: Any, root: type[BaseModel], rename: Callable[[tuple[Any, ...]], tuple[Any, ...]]) -> str:
    loc = tuple(error["loc"])
    path = _path(rename(loc)) or "spec"
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    holder, info = _walk_fields(root, loc)
    if kind == "extra_forbidden":
        allowed = list(holder.model_fields) if holder is not None else []
        key = str(loc[-1])
        hint = difflib.get_close_matches(key, allowed, n=1)
        suggestion = f"; did you mean {hint[0]}?" if hint else ""
        return f"{path}: unknown key (allowed: {', '.join(allowed)}){suggestion}"
    if kind == "missing":
        return f"{path}: required but missing"
    if kind == "literal_error":
        choices = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
        line = f"{path}: {show_value(value)} is not one of {choices}"
        if loc[-1] == "norm" and isinstance(value, str) and value.endswith("*"):
            line += " (BN* is a grid value: grid.norm: [bn*]; or set workload.model.bn_star_epochs, Section 4.3)"
        return line
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{path}: {show_value(value)} is out of range {_allowed_range(info, ctx)}".rstrip()
    if kind in ("too_short", "too_long"):
        return f"{path}: {error['msg'].lower()}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{path}: {show_value(value)} is not an integer"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return f"{path}: {show_value(value)} is not a number"
    if kind in ("bool_type", "bool_parsing"):
        return f"{path}: {show_value(value)} is not a boolean (true or false)"
    if kind in ("string_type", "string_too_short"):
        return f"{path}: {show_value(value)} is not a string" if kind == "string_type" else f"{path}: empty"
    if kind in ("list_type", "tuple_type"):
        return f"{path}: {show_value(value)} is not a list"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        target = _model_in(info.annotation) if info is not None else root if not loc else None
        keys = f" with keys {', '.join(target.model_fields)}" if target is not None else ""
        return f"{path}: {show_value(value)} is not a mapping; expected a mapping{keys}"
    if kind == "value_error":
        return f"{path}: {ctx.get('error', error['msg'])}"
    if kind == "assertion_error":
        return f"{path}: {error['msg']}"
    expected = _annotation_name(info)
    detail = f"{error['msg']}; expected {expected}" if expected else error["msg"]
    return f"{path}: {show_value(value)} is invalid ({detail})"


def format_validation_error(
    error: ValidationError,
    root: type[BaseModel],
    *,
    rename: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None,
    prefix: str = "",
) -> str:
    """One line per pydantic error, in pydantic's (document) order, duplicates dropped.

    `root` is the model that was validated (to list allowed keys and ranges); `rename` rewrites a location
    (the mapping form of `grid` is validated as a one-element list); `prefix` goes in front of every line.
    """
    lines: list[str] = []
    for item in error.errors(include_url=False):
        line = prefix + _error_line(item, root, rename or (lambda loc: loc))
        if line not in lines:
            lines.append(line)
    return join_lines(lines)


def join_lines(lines: list[str], limit: int = 30) -> str:
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more errors"]
    return "\n".join(lines)
