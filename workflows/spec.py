"""Specs: YAML + dotted command-line overrides -> a typed workflow config and run settings.

A spec names its workflow, optionally a `run:` section (RunSettings), and the workflow's config
fields at the top level::

    workflow: demo
    run: {store: .interpflow/store}
    square: {power: 2}

Every problem is reported as one `SpecError` naming the field and the fix, before Ray starts.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ValidationError

from interpflow.workflows.engine.keys import canonical_json
from interpflow.workflows.engine.settings import RunSettings

# Workflow name -> "module:builder". A builder takes its typed config and returns a Graph; the
# module may define `validate(config)` for checks that need more than pydantic (raise ValueError).
WORKFLOWS: dict[str, str] = {
    "demo": "interpflow.workflows.demo:demo_graph",
    "extract": "interpflow.workflows.extract:extract_graph",
    "sae": "interpflow.workflows.sae:sae_graph",
    "sae_bench": "interpflow.workflows.sae_bench:sae_bench_graph",
    "human_study": "interpflow.workflows.human_study:human_study_graph",
    "influence": "interpflow.workflows.influence:influence_graph",
    "physics_probing": "interpflow.workflows.physics_probing:physics_graph",
    "persuasion": "interpflow.workflows.persuasion:persuasion_graph",
    "news_benchmark": "interpflow.workflows.news_benchmark:news_graph",
    "tamper": "interpflow.workflows.tamper:tamper_graph",
    "vcc": "interpflow.workflows.vcc:vcc_graph",
    "vtcd": "interpflow.workflows.vtcd:vtcd_graph",
}

SPECS_DIR = Path(__file__).resolve().parent / "specs"


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the YAML 1.2 core schema for plain scalars, for spec files and overrides.

    PyYAML implements YAML 1.1, where `lr: 1e-2` is the string "1e-2" (1.1 floats need a dot) and
    `yes`/`no`/`on`/`off` are booleans (`country: no` became False). Under the 1.2 core schema a bool is
    only true/false, null is null/~/empty, ints are decimal (`010` is ten), `0o17` or `0x1f`, floats
    include `1e-2`, `.5`, `.inf` and `.nan`, and everything else is a string (`yes`, `off`, `1_000`,
    `2024-01-01`, `12:30`). Quoted scalars and explicit tags (`!!bool yes`) are as before."""


_TAG = "tag:yaml.org,2002:"
_CORE_SCHEMA = [  # (tag, pattern, the characters a matching scalar can start with), tried in this order
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
     "-+0123456789."),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
]
# YAML 1.1's own resolvers for these, and its timestamp and `=` value types, go; the merge key `<<` stays.
_DROPPED = {_TAG + name for name in ("bool", "int", "float", "null", "timestamp", "value")}
Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _DROPPED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _name, _pattern, _first in _CORE_SCHEMA:
    Yaml12Loader.add_implicit_resolver(_TAG + _name, re.compile(f"^(?:{_pattern})$"), list(_first))


def _construct_int(loader: Yaml12Loader, node: yaml.ScalarNode) -> int:
    value = str(loader.construct_scalar(node))
    if value.startswith(("0o", "0x")):
        return int(value[2:], 8 if value[1] == "o" else 16)
    return int(value)  # YAML 1.2: a leading 0 is no octal prefix


Yaml12Loader.add_constructor(_TAG + "int", _construct_int)


def parse_yaml(text: str) -> Any:
    """YAML text as Python values under the YAML 1.2 core schema (see `Yaml12Loader`)."""
    return yaml.load(text, Loader=Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


class SpecError(ValueError):
    """A spec problem a user can fix; the CLI prints it and exits with code 2.

    Its message is always one line (whitespace runs, newlines included, become one space), whatever
    the underlying error said: the CLI prints exactly one line on stderr."""

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class Spec:
    workflow: str
    config: BaseModel
    settings: RunSettings
    raw: dict[str, Any]  # the spec after overrides, as the user wrote it
    source: str

    @property
    def builder(self) -> Callable:
        return workflow_builder(self.workflow)[0]

    def digest(self) -> str:
        """Identity of what this spec computes (workflow + config); run settings excluded."""
        return spec_digest(self.workflow, self.config.model_dump(mode="json"))


def spec_digest(workflow: str, config: dict) -> str:
    """`Spec.digest` from a workflow name and its config as JSON-ready data (a run record keeps both)."""
    payload = {"workflow": workflow, "config": config}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def workflow_builder(name: str) -> tuple[Callable, type[BaseModel]]:
    if name not in WORKFLOWS:
        known = ", ".join(sorted(WORKFLOWS))
        raise SpecError(f"workflow: unknown workflow '{name}'. Fix: use one of: {known}")
    module, _, attr = WORKFLOWS[name].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    hints = typing.get_type_hints(builder)
    config_type = next(v for k, v in hints.items() if k != "return")
    return builder, config_type


def workflow_of_config(config: BaseModel) -> str:
    for name in WORKFLOWS:
        if workflow_builder(name)[1] is type(config):
            return name
    raise SpecError(f"no registered workflow takes a {type(config).__name__} config")


def resolve_spec_path(spec: str | Path) -> Path:
    """A spec file path, or the name of a bundled spec (`demo` -> workflows/specs/demo.yaml)."""
    path = Path(spec)
    if path.is_dir():
        raise SpecError(f"spec: '{spec}' is a directory, not a spec file. Fix: give the path of a YAML spec "
                        f"file (e.g. {Path(spec) / 'spec.yaml'}) or a bundled spec name")
    if path.exists():
        return path
    bundled = SPECS_DIR / f"{spec}.yaml"
    if bundled.exists():
        return bundled
    names = ", ".join(sorted(p.stem for p in SPECS_DIR.glob("*.yaml")))
    raise SpecError(f"spec: no file '{spec}'. Fix: give a path to a YAML spec, or a bundled spec name: {names}")


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise SpecError(f"spec: '{path}' is a directory, not a spec file. Fix: give the path of a YAML spec "
                        "file") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"spec: '{path}' is not UTF-8 text (undecodable byte at offset {exc.start}): it is not "
                        "a YAML spec. Fix: give the path of a YAML spec file") from None
    except OSError as exc:
        raise SpecError(f"spec: cannot read '{path}' ({exc.strerror or exc}). Fix: give a readable YAML spec "
                        "file") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{path}: malformed YAML{where}: {problem}. Fix the YAML syntax there.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec must be a YAML mapping (workflow: NAME, then config fields), "
                        f"got a {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """`sae.k=64` sets data['sae']['k'] = 64 (values parsed as YAML 1.2: numbers, true/false, lists)."""
    data = copy.deepcopy(data)
    for item in overrides:
        path, sep, value = item.partition("=")
        if not sep or not path.strip():
            raise SpecError(f"override {item!r}: expected FIELD=VALUE, e.g. square.power=3")
        try:
            parsed = parse_yaml(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        target = data
        keys = path.strip().split(".")
        for k in keys[:-1]:
            if not isinstance(target.get(k, {}), dict):
                raise SpecError(f"override {item!r}: '{k}' is not a section, so it has no field '{keys[-1]}'")
            target = target.setdefault(k, {})
        target[keys[-1]] = parsed
    return data


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in over.items()}}
    return over


def over_defaults(config_type: type[BaseModel], fields: dict) -> dict:
    """The spec's fields laid over the workflow's defaults, so that a section given in part keeps the
    defaults of what it leaves out (`fit: {train: {steps: 100}}` keeps the default `fit.train.sae`)."""
    try:
        defaults = config_type().model_dump(mode="python")
    except ValidationError:
        return fields
    return _merge(defaults, fields)


def _fields_of(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at the parent of `loc` (for 'unknown field' messages)."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        annotation = fields[part].annotation
        args = [a for a in typing.get_args(annotation) if isinstance(a, type)] or [annotation]
        current = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def explain_validation(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    errors = exc.errors()
    first = errors[0]
    loc = tuple(p for p in first["loc"] if not isinstance(p, int))
    field = prefix + ".".join(str(p) for p in first["loc"])
    if not field.isprintable():  # a key with control characters or newlines, shown escaped on one line
        field = field.encode("unicode_escape").decode("ascii")
    more = f" ({len(errors) - 1} more problem(s) after this one)" if len(errors) > 1 else ""
    if first["type"] in ("extra_forbidden", "invalid_key"):  # invalid_key: a YAML key that is no string (`1: 2`)
        valid = _fields_of(model, loc)
        return (f"unknown field '{field}'. Fix: remove it or correct the spelling; valid fields here: "
                f"{', '.join(valid) or '(none)'}{more}")
    if first["type"] == "missing":
        return f"field '{field}' is required. Fix: set it in the spec or pass {field}=VALUE{more}"
    if first["type"] == "value_error" and "error" in first.get("ctx", {}):
        # a validator's own message: it names its field and fix itself, or gets the generic fix
        message = str(first["ctx"]["error"]).strip()
        if not message.startswith(field):
            message = f"field '{field}': {message}"
        if not any(mark in message for mark in ("Fix", "fix", "; ")):  # "...; set X" names its fix
            message += f". Fix: give {field} a valid value in the spec or on the command line as {field}=VALUE"
        return message + more
    got = first.get("input")
    got_text = "" if isinstance(got, (dict, list)) else f" (got {_short(got)})"
    return (f"field '{field}': {first['msg']}{got_text}. Fix: give {field} a valid value in the spec "
            f"or on the command line as {field}=VALUE{more}")


def brief(exc: Exception) -> str:
    """An exception in one line, for a message that wraps it: a pydantic ValidationError as `field: problem`
    of its first error (its own text spans several lines and links to the pydantic docs)."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "value_error" and "error" in first.get("ctx", {}):
            message = str(first["ctx"]["error"])
        else:
            message = first["msg"]
        return " ".join((f"{where}: {message}" if where else message).split())
    return " ".join(str(exc).split())


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_spec(spec: str | Path | dict, overrides: list[str] | tuple[str, ...] = (),
              check_store: bool = True) -> Spec:
    """Read, override and validate a spec; check the store is reachable. Raises SpecError."""
    if isinstance(spec, dict):
        data, source = copy.deepcopy(spec), "<dict>"
    else:
        path = resolve_spec_path(spec)
        data, source = read_yaml(path), str(path)
    data = apply_overrides(data, overrides)
    name = data.get("workflow")
    if not name:
        raise SpecError(f"{source}: the spec names no workflow. Fix: add 'workflow: NAME' "
                        f"(one of: {', '.join(sorted(WORKFLOWS))})")
    _, config_type = workflow_builder(str(name))
    run_section = data.get("run") or {}
    if not isinstance(run_section, dict):
        raise SpecError("field 'run': must be a mapping of run settings (store, tracking_uri, ...)")
    try:
        settings = RunSettings.model_validate(run_section)
    except ValidationError as exc:
        raise SpecError(explain_validation(exc, RunSettings, "run.")) from None
    fields = over_defaults(config_type, {k: v for k, v in data.items() if k not in ("workflow", "run")})
    try:
        config = config_type.model_validate(fields)
    except ValidationError as exc:
        raise SpecError(explain_validation(exc, config_type)) from None
    validate = getattr(importlib.import_module(WORKFLOWS[str(name)].partition(":")[0]), "validate", None)
    if validate is not None:
        try:
            validate(config)
        except (ValueError, FileNotFoundError, OSError) as exc:
            raise SpecError(str(exc).strip("'\"")) from None
    if check_store:
        check_settings(settings)
    return Spec(str(name), config, settings, data, source)


def check_settings(settings: RunSettings) -> None:
    from interpflow.workflows.engine.store import Store, StoreError

    try:
        Store(settings.resolved_store()).check_reachable()
    except (StoreError, OSError, ValueError) as exc:
        raise SpecError(f"field 'run.store': {exc}. Fix: point run.store at a writable directory or a "
                        "reachable URI (s3://bucket/prefix with credentials in the environment)") from None
    try:
        if settings.lineage:  # no MLflow (run.lineage=false): no tracking URI to resolve
            settings.resolved_tracking_uri()
    except ValueError as exc:
        raise SpecError(f"field 'run.tracking_uri': {exc}") from None
