"""Reading the manifests under deploy/ and building a kustomization (the subset they use), in Python."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from orchestrator.deploy.layout import (
    IMAGE_NAME,
    KUSTOMIZATION_KEYS,
    OVERLAYS_DIR,
)
from orchestrator.deploy.rules import (
    DeployError,
    Doc,
    containers,
    doc_id,
    split_image,
)

# ------------------------------------------------------------------------------------------------------------
# Reading YAML and walking manifests


def load_yaml_documents(path: Path) -> list[Doc]:
    """The non-empty documents of a (multi-document) YAML file; each must be a mapping."""
    try:
        documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except yaml.YAMLError as exc:
        raise DeployError(f"{path}: not valid YAML ({type(exc).__name__})") from None
    docs = [doc for doc in documents if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise DeployError(f"{path}: every document must be a mapping")
    return docs


def is_project_image(ref: str) -> bool:
    return split_image(ref)[0].rsplit("/", 1)[-1] == IMAGE_NAME


def image_flavour(ref: str) -> str | None:
    """'gpu' or 'cpu' from a project image tag like 2.60.0-gpu-1a2b3c4 (None if it has no flavour)."""
    tag = split_image(ref)[1] or ""
    match = re.fullmatch(r"[0-9][^-]*-(gpu|cpu)(-.+)?", tag)
    return match.group(1) if match else None


# ------------------------------------------------------------------------------------------------------------
# Building a kustomization (the subset the manifests use)


def build(path: Path) -> list[Doc]:
    """The objects `kubectl kustomize PATH` would print, for kustomizations within our subset."""
    return _build(path.resolve(), ())


def _build(path: Path, stack: tuple[Path, ...]) -> list[Doc]:
    if path in stack:
        raise DeployError(f"{path}: kustomization cycle")
    file = path / "kustomization.yaml"
    if not file.is_file():
        raise DeployError(f"{path}: no kustomization.yaml")
    loaded = load_yaml_documents(file)
    if len(loaded) != 1:
        raise DeployError(f"{file}: expected one document")
    kustomization = loaded[0]
    unknown = sorted(set(kustomization) - KUSTOMIZATION_KEYS)
    if unknown:
        raise DeployError(
            f"{file}: {', '.join(unknown)} not supported by orchestrator.deploy's renderer "
            f"(it supports {', '.join(sorted(KUSTOMIZATION_KEYS))}); express it as a JSON patch"
        )
    docs: list[Doc] = []
    for entry in kustomization.get("resources") or []:
        target = path / str(entry)
        if target.is_dir():
            docs.extend(_build(target.resolve(), (*stack, path)))
        elif target.is_file():
            # kustomize's default load restrictor: files must lie inside the kustomization's own folder.
            if not target.resolve().is_relative_to(path):
                raise DeployError(f"{file}: {entry!r} lies outside {path}; kustomize refuses it (use a directory)")
            docs.extend(load_yaml_documents(target))
        else:
            raise DeployError(f"{file}: resource {entry!r} not found")
    seen: set[str] = set()
    for doc in docs:
        if doc_id(doc) in seen:
            raise DeployError(f"{file}: {doc_id(doc)} defined twice")
        seen.add(doc_id(doc))
    for patch in kustomization.get("patches") or []:
        _apply_patch_entry(file, patch, docs)
    for image in kustomization.get("images") or []:
        _set_image(image, docs)
    return docs


def _apply_patch_entry(file: Path, entry: Doc, docs: list[Doc]) -> None:
    if "path" in entry:
        ops = yaml.safe_load((file.parent / entry["path"]).read_text(encoding="utf-8"))
    else:
        ops = yaml.safe_load(entry.get("patch") or "")
    if not isinstance(ops, list):
        raise DeployError(f"{file}: only JSON 6902 patches (a list of operations) are supported")
    target = entry.get("target") or {}
    extra = set(target) - {"group", "version", "kind", "name"}
    if not target or extra:
        raise DeployError(f"{file}: a patch needs a target of group, version, kind and name")
    matched = [doc for doc in docs if _matches(doc, target)]
    if not matched:
        raise DeployError(f"{file}: patch target {target} matches nothing")
    for doc in matched:
        try:
            apply_json_patch(doc, ops)
        except DeployError as err:
            raise DeployError(f"{file}: {err}") from None


def _matches(doc: Doc, target: Doc) -> bool:
    group, _, version = str(doc.get("apiVersion", "")).rpartition("/")
    actual = {
        "group": group,
        "version": version,
        "kind": doc.get("kind"),
        "name": (doc.get("metadata") or {}).get("name"),
    }
    return all(actual[key] == value for key, value in target.items())


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise DeployError(f"JSON pointer {path!r} must start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(container: list[Any], token: str, path: str, *, end_ok: bool = False) -> int:
    if end_ok and token == "-":
        return len(container)
    if not token.isdigit() or int(token) > len(container) - (0 if end_ok else 1):
        raise DeployError(f"{path}: index {token} out of range")
    return int(token)


def apply_json_patch(doc: Doc, ops: Sequence[Any]) -> None:
    """RFC 6902 add, remove, replace and test, in place."""
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise DeployError(f"not a JSON patch operation: {op!r}")
        kind, path = op["op"], op["path"]
        tokens = _pointer(path)
        if not tokens:
            raise DeployError(f"{path!r}: patching the whole document is not supported")
        parent: Any = doc
        for token in tokens[:-1]:
            try:
                parent = parent[_index(parent, token, path)] if isinstance(parent, list) else parent[token]
            except (KeyError, TypeError):
                raise DeployError(f"{path}: {token!r} not found") from None
        last = tokens[-1]
        if kind == "add":
            if isinstance(parent, list):
                parent.insert(_index(parent, last, path, end_ok=True), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind in ("replace", "remove", "test"):
            if isinstance(parent, list):
                key: Any = _index(parent, last, path)
            elif isinstance(parent, dict) and last in parent:
                key = last
            else:
                raise DeployError(f"{path}: nothing to {kind}")
            if kind == "replace":
                parent[key] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[key]
            elif parent[key] != op["value"]:
                raise DeployError(f"{path}: test failed")
        else:
            raise DeployError(f"{path}: JSON patch op {kind!r} not supported (add, remove, replace, test)")


def _set_image(entry: Doc, docs: list[Doc]) -> None:
    """kustomize's `images`: a container whose image name equals `name` gets newName, newTag and/or digest (both:
    `name:tag@digest`, as kustomize 5 writes it)."""
    for doc in docs:
        for container in containers(doc):
            name, tag, digest = split_image(str(container.get("image", "")))
            if name != entry.get("name"):
                continue
            name = entry.get("newName") or name
            if "digest" in entry and "newTag" in entry:
                tag, digest = str(entry["newTag"]), entry["digest"]
            elif "digest" in entry:
                tag, digest = None, entry["digest"]
            elif "newTag" in entry:
                tag, digest = str(entry["newTag"]), None
            container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def overlay_names() -> list[str]:
    return sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())


def overlay_dir(name: str) -> Path:
    names = overlay_names()
    if name not in names:
        raise DeployError(f"unknown overlay {name!r}; one of {', '.join(names)}")
    return OVERLAYS_DIR / name
