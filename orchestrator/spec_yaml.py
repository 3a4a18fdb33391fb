"""A spec file as a document: YAML read safely (no duplicate keys, 1e-4 a float, bounded size and nesting), then
scanned for credentials and alias bombs before the schema sees it, so no later message can echo a secret."""

from __future__ import annotations

import re
from typing import Any

import yaml

from orchestrator.credentials import CREDENTIALS_HINT, credential_in_text, looks_like_credential_name
from orchestrator.spec_messages import SpecError, join_lines, show_value

MAX_SPEC_BYTES = 1 << 20
# Expanded size of the parsed document (YAML aliases can make a small file huge): far above any real spec.
MAX_SPEC_VALUES = 200_000
MAX_NESTING = 32


class SpecLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (YAML keeps the last silently) and reads 1e-4 as a float."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


# PyYAML implements YAML 1.1, where `1e-4` (no dot) is a string; researchers write weight decays that way.
SpecLoader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def scan(data: Any) -> None:
    """Reject credentials anywhere in the document, non-JSON values and alias bombs, before pydantic sees it.

    Runs first so that no later message (unknown key, wrong type) can echo a secret value.
    """
    memo: dict[int, int] = {}
    problems: list[str] = []

    def visit(node: Any, path: str, depth: int) -> int:
        if depth > MAX_NESTING:
            raise SpecError(f"{path or 'spec'}: nested more than {MAX_NESTING} levels deep")
        if isinstance(node, str):
            why = credential_in_text(node)
            if why:
                problems.append(f"{path or 'spec'}: looks like a credential ({why}); {CREDENTIALS_HINT}")
            return 1
        if node is None or isinstance(node, bool | int | float):
            return 1
        if id(node) in memo:  # an alias: already scanned, count its expanded size again
            return memo[id(node)]
        size = 1
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise SpecError(f"{path or 'spec'}: key {show_value(key)} is not a string")
                shown = key if re.fullmatch(r"[A-Za-z0-9_*-]+", key) else repr(key)
                child = f"{path}.{shown}" if path else shown
                if credential_in_text(key):
                    problems.append(f"{path or 'spec'}: a key looks like a credential; {CREDENTIALS_HINT}")
                    continue
                if looks_like_credential_name(key):
                    problems.append(f"{child}: looks like a credential key; {CREDENTIALS_HINT}")
                    continue
                size += visit(value, child, depth + 1)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                size += visit(value, f"{path}[{i}]", depth + 1)
        else:
            raise SpecError(
                f"{path or 'spec'}: a YAML {type(node).__name__} value is not supported here; quote it to make a string"
            )
        if size > MAX_SPEC_VALUES:
            raise SpecError(f"spec expands to more than {MAX_SPEC_VALUES:,} values (YAML aliases?)")
        memo[id(node)] = size
        return size

    visit(data, "", 0)
    if problems:
        raise SpecError(join_lines(problems))
