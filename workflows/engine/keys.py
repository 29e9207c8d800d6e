"""Node keys: content addresses that make caching and resume trustworthy.

A key is sha256 over canonical JSON of the parts that decide a node's output: its name, an explicit
version, a hash of the task function's normalised source (and of the project functions it calls),
its config, its upstream keys, and the identity of external inputs. The parts are kept next to the
key so that a cache miss can be explained part by part (`interpflow explain`).

External inputs are keyed by content, not location: an identity `{"path": P, "digest": D, ...}` enters the
key without its path, and a config string that names P (as written or resolved) enters as
`<external:NAME>`. The byte-identical model or dataset at another path (another node's mount, another
user's checkout) hits the same cache. A hub id (`{"id": ..., "revision": ...}`) is its own identity.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import textwrap
import types
from typing import Any, Callable

from pydantic import BaseModel

from interpflow.tasks.digests import canonical_json, directory_digest, file_digest, sha256_text

PROJECT_PREFIX = "interpflow."
# The engine itself decides where things run, not what they compute: its code is not part of keys.
_ENGINE_PREFIX = "interpflow.workflows.engine"


def config_dict(config: BaseModel | dict | None) -> dict:
    if config is None:
        return {}
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    return json.loads(canonical_json(config))


def _resolved(value: str) -> str:
    return os.path.realpath(os.path.expanduser(value))


def content_keyed(config: dict, external: dict[str, Any]) -> tuple[dict, dict[str, Any]]:
    """(config, external) as they enter a key: located identities lose their path, and config strings
    naming one of those paths become `<external:NAME>` (see the module docstring)."""
    named: dict[str, str] = {}  # resolved path -> external name

    def strip(name: str, value: Any) -> Any:
        if isinstance(value, dict):
            if "digest" in value and isinstance(value.get("path"), str):
                named[_resolved(value["path"])] = name
                value = {k: v for k, v in value.items() if k != "path"}
            return {k: strip(name, v) for k, v in value.items()}
        return value

    external = {name: strip(name, value) for name, value in external.items()}
    if not named:
        return config, external

    def replace(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: replace(v) for k, v in value.items()}
        if isinstance(value, list):
            return [replace(v) for v in value]
        if isinstance(value, str) and value and len(value) < 4096:
            name = named.get(value) or named.get(_resolved(value))
            return f"<external:{name}>" if name else value
        return value

    return replace(config), external


class _StripDocstrings(ast.NodeTransformer):
    def _strip(self, node):
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Module = _strip


def _normalised_source(obj: Any) -> tuple[str, ast.AST]:
    source = textwrap.dedent(inspect.getsource(obj))
    tree = _StripDocstrings().visit(ast.parse(source))
    # ast.dump without attributes ignores line numbers; comments and formatting never reach the AST.
    return ast.dump(tree, annotate_fields=True, include_attributes=False), tree


def _is_project_code(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module.startswith(PROJECT_PREFIX) and not module.startswith(_ENGINE_PREFIX)


def _referenced_objects(fn: Any, tree: ast.AST) -> list[Any]:
    """Project functions and classes that `fn`'s body names, resolved through its globals."""
    namespace: dict[str, Any] = dict(getattr(fn, "__globals__", {}) or {})
    if isinstance(fn, type):
        namespace = dict(vars(inspect.getmodule(fn)) if inspect.getmodule(fn) else {})
    closure = getattr(fn, "__closure__", None)
    if closure and getattr(fn, "__code__", None):
        for name, cell in zip(fn.__code__.co_freevars, closure):
            try:
                namespace[name] = cell.cell_contents
            except ValueError:
                pass
    found: list[Any] = []
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            # a name assigned to (e.g. pydantic's `model_config = ...` in a class body) is no dependency,
            # even where a project function of that name exists
            target = namespace.get(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            base = namespace.get(node.value.id)
            if isinstance(base, types.ModuleType) and base.__name__.startswith(PROJECT_PREFIX):
                target = getattr(base, node.attr, None)
        if target is not None and (inspect.isfunction(target) or inspect.isclass(target)) \
                and _is_project_code(target):
            found.append(target)
    return found


_SOURCE_CACHE: dict[Any, str] = {}


def source_hash(fn: Callable) -> str:
    """Hash of `fn`'s normalised source and, transitively, of the project code it references.

    Comments, docstrings and formatting do not count; any change to code does.
    """
    fn = inspect.unwrap(fn)
    cached = _SOURCE_CACHE.get(fn)
    if cached is not None:
        return cached
    parts: dict[str, str] = {}
    stack = [fn]
    while stack:
        obj = stack.pop()
        label = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
        if label in parts:
            continue
        try:
            dumped, tree = _normalised_source(obj)
        except (OSError, TypeError):
            # Builtins or code without source: fall back to the qualified name alone.
            parts[label] = "no-source"
            continue
        parts[label] = sha256_text(dumped)
        stack.extend(_referenced_objects(obj, tree))
    digest = sha256_text(canonical_json(parts))
    _SOURCE_CACHE[fn] = digest
    return digest


def clear_source_cache() -> None:
    """Forget cached source hashes (after editing code in a live session, e.g. a notebook)."""
    _SOURCE_CACHE.clear()


def node_key(parts: dict[str, Any]) -> str:
    return sha256_text(canonical_json(parts))


def diff_parts(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the key parts that differ between two part dicts (for `explain`)."""
    changed: list[str] = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        label = f"{prefix}{name}"
        if isinstance(a, dict) and isinstance(b, dict):
            changed.extend(diff_parts(a, b, label + "."))
        elif a != b:
            changed.append(label)
    return changed
