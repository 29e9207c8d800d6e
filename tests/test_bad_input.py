"""Bad input (issue #28): every case ends in one `SpecError` line naming the field or file and the fix,
before any compute, and the CLI turns it into exit code 2 with exactly one line on stderr.

Most cases are checked in-process through `load_spec` (the CLI's validation entry point); a handful go
through the real CLI in subprocesses; a property-based test feeds random specs and overrides."""

from __future__ import annotations

import contextlib
import json
import math
import struct
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from support import cli

from interpflow.tasks import datasets_io, models
from interpflow.workflows.spec import WORKFLOWS, SpecError, load_spec, workflow_builder


def spec_error(spec, *overrides: str, check_store: bool = False) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(spec, list(overrides), check_store=check_store)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Bad (and good) spec, data and model files."""
    root = tmp_path_factory.mktemp("bad_input")
    (root / "binary.yaml").write_bytes(bytes(range(128, 256)) * 4)
    (root / "a_folder").mkdir()
    (root / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    (root / "good.jsonl").write_text('{"id": 7, "text": "alpha beta"}\n\n{"id": 9, "text": "gamma"}\n')
    (root / "duplicate.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n{"id": 1, "text": "c"}\n')
    (root / "no_text.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n{"id": 3, "body": "c"}\n')
    (root / "null_text.jsonl").write_text('{"text": "a"}\n{"text": null}\n')
    (root / "not_object.jsonl").write_text('{"text": "a"}\n["text", "b"]\n')
    (root / "not_json.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    (root / "blank.jsonl").write_text("\n\n")
    (root / "partial_ids.jsonl").write_text('{"id": 1, "text": "a"}\n{"text": "b"}\n')
    (root / "list.json").write_text(json.dumps([{"id": 1, "text": "a"}, {"id": 2}], indent=2))
    (root / "no_text.csv").write_text("id,body\n1,a\n")
    (root / "empty_cell.csv").write_text('id,text\n1,a\n2,"b, c"\n3,\n')
    (root / "duplicate.csv").write_text("id,text\n5,a\n6,b\n5,c\n")
    (root / "binary.parquet").write_bytes(b"PAR1" + bytes(range(256)))
    (root / "binary.txt").write_bytes(bytes(range(128, 256)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["a", None, "c"]}), root / "null_text.parquet")
    pq.write_table(pa.table({"id": ["x", "y", "x"], "text": ["a", "b", "c"]}), root / "duplicate.parquet")
    return root


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 folder, and copies of it with broken or missing weights."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("models")
    good = root / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(good)
    weights = (good / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", weights[:8])[0]
    broken = {
        "truncated": weights[: len(weights) // 2],                        # tensors run past the end
        "garbage": b"\xff" * 64,                                          # header length absurd
        "bad_header": weights[:8] + b"[" * header_len + weights[8 + header_len:],   # header is not JSON
        "tiny": b"\x01\x02",                                              # shorter than the length field
    }
    dirs = {"good": good}
    for name, data in broken.items():
        folder = root / name
        shutil.copytree(good, folder)
        (folder / "model.safetensors").write_bytes(data)
        dirs[name] = folder
    dirs["no_weights"] = root / "no_weights"
    dirs["no_weights"].mkdir()
    shutil.copy(good / "config.json", dirs["no_weights"] / "config.json")
    dirs["missing_shard"] = root / "missing_shard"
    shutil.copytree(good, dirs["missing_shard"])
    (dirs["missing_shard"] / "model.safetensors").rename(dirs["missing_shard"] / "model-00001-of-00002.safetensors")
    (dirs["missing_shard"] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return dirs


# ------------------------------------------------------------------------- 1. spec files that are not YAML


@pytest.mark.parametrize("name, fragments", [
    ("binary.yaml", ["binary.yaml' is not UTF-8 text", "Fix: give the path of a YAML spec file"]),
    ("a_folder", ["a_folder' is a directory, not a spec file", "Fix"]),
])
def test_spec_path_that_is_no_yaml_file(files, name, fragments):
    message = spec_error(str(files / name))
    assert all(f in message for f in fragments), message


def test_yaml_with_control_characters_is_one_line(files):
    path = files / "control.yaml"
    path.write_text("workflow: demo\nnumbers: {n: \x00}\n")
    assert "malformed YAML" in spec_error(str(path))


@pytest.mark.parametrize("text, overrides, fragment", [
    ("workflow: demo\n1: 2\n", [], "unknown field '1'"),                     # a YAML key that is no string
    ("workflow: demo\n", ["run={1: 2}"], "unknown field 'run.1'"),
    ("workflow: demo\nrun: [1]\n", [], "field 'run': must be a mapping"),
    ("workflow: demo\n", ["numbers=[1, 2]"], "field 'numbers'"),
])
def test_sections_of_the_wrong_shape(files, text, overrides, fragment):
    path = files / "shape.yaml"
    path.write_text(text)
    assert fragment in spec_error(str(path), *overrides)


# --------------------------------------------------------------------------- 2. run.retry_exceptions


@pytest.mark.parametrize("names, fragment", [
    ("[NoSuchError]", "no exception 'NoSuchError' in Python's builtins"),
    ("[ConnectionError, no_such_module_x.Error]", "cannot import module 'no_such_module_x'"),
    ("[json.NoSuchError]", "no exception 'json.NoSuchError' in module 'json'"),
    ("[os.path]", "'os.path' is not an Exception subclass"),
    ("[KeyboardInterrupt]", "'KeyboardInterrupt' is not an Exception subclass"),
    ("['Connection Error']", "is not an exception class name"),
])
def test_retry_exceptions_must_name_exception_classes(names, fragment):
    message = spec_error("demo", f"run.retry_exceptions={names}")
    assert message.startswith("run.retry_exceptions:") and fragment in message and "Fix:" in message, message


def test_retry_exceptions_accepts_builtins_and_dotted_classes():
    spec = load_spec("demo", ["run.retry_exceptions=[TimeoutError, json.JSONDecodeError, socket.timeout]"],
                     check_store=False)
    assert spec.settings.retry_exceptions[1] == "json.JSONDecodeError"


# ----------------------------------------------------------------------------- 3. sizes and 4. seeds


@pytest.mark.parametrize("workflow, override, field", [
    ("demo", "numbers.n=1000000000000", "numbers.n"),
    ("demo", "num_shards=1000000000", "num_shards"),
    ("sae_bench", "identifiability.data.n=99999999999", "identifiability.data.n"),
    ("influence", "planted.n_train=10000000000", "planted.n_train"),
    ("human_study", "study.n_per_arm=1000000000", "study.n_per_arm"),
    ("physics_probing", "video_model.train_clips=1000000000", "video_model.train_clips"),
    ("vcc", "images.n_images=1000000000", "images.n_images"),
])
def test_sizes_have_upper_bounds(workflow, override, field):
    message = spec_error(workflow, override)
    assert f"field '{field}'" in message and "less than or equal to" in message and "Fix" in message, message


def test_documented_sizes_stay_valid():
    spec = load_spec("demo", ["numbers.n=10000000", "num_shards=64"], check_store=False)
    assert spec.config.numbers.n == 10_000_000


@pytest.mark.parametrize("workflow, override, field", [
    ("demo", "numbers.seed=-1", "numbers.seed"),
    ("extract", "lm.seed=-5", "lm.seed"),
    ("sae_bench", "stability.seeds=[0, -1]", "stability.seeds.1"),
    ("influence", "removal.random_seeds=[3, -2]", "removal.random_seeds.1"),
    ("demo", "numbers.seed=4294967296", "numbers.seed"),
])
def test_seeds_are_non_negative_32_bit(workflow, override, field):
    message = spec_error(workflow, override)
    assert f"field '{field}'" in message and "Fix" in message, message


def _models_of(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_of(arg)]


def _all_config_models() -> set[type[BaseModel]]:
    seen: set[type[BaseModel]] = set()
    todo = [workflow_builder(name)[1] for name in WORKFLOWS]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for field in model.model_fields.values():
            todo.extend(_models_of(field.annotation))
    return seen


def test_every_config_seed_rejects_negative_values():
    """Every config field named seed / *_seed / *seeds, in every workflow's config tree, rejects -1."""
    from pydantic import TypeAdapter

    seeds = []
    for model in _all_config_models():
        for name, field in model.model_fields.items():
            if name in ("seed", "seeds") or name.endswith(("_seed", "_seeds")):
                annotation = field.annotation
                adapter = TypeAdapter(typing.Annotated[(annotation, *field.metadata)] if field.metadata
                                      else annotation)
                bad = [-1] if typing.get_origin(field.annotation) is list else -1
                with pytest.raises(ValueError):
                    adapter.validate_python(bad)
                seeds.append(f"{model.__name__}.{name}")
    assert len(seeds) > 40 and "NumbersConfig.seed" in seeds and "StabilityConfig.seeds" in seeds


# --------------------------------------------------------------------------------------- 5. data files


@pytest.mark.parametrize("name, fragments", [
    ("binary.jsonl", ["dataset.path: line 1 of binary.jsonl is not UTF-8 text"]),
    ("duplicate.jsonl", ["duplicate.jsonl has duplicate id 1 (lines 1 and 3)", "ids must be unique"]),
    ("no_text.jsonl", ["dataset.path: line 3 of no_text.jsonl has no 'text' field"]),
    ("null_text.jsonl", ["line 2 of null_text.jsonl has a 'text' that is not a string"]),
    ("not_object.jsonl", ["line 2 of not_object.jsonl is a JSON list, not an object"]),
    ("not_json.jsonl", ["line 2 of not_json.jsonl is not valid JSON"]),
    ("blank.jsonl", ["blank.jsonl holds no examples"]),
    ("partial_ids.jsonl", ["line 2 of partial_ids.jsonl has no 'id' field while other rows have one"]),
    ("list.json", ["record 2 of list.json has no 'text' field"]),
    ("no_text.csv", ["no_text.csv has no column(s) ['text']"]),
    ("empty_cell.csv", ["row 3 of empty_cell.csv has no 'text' value"]),
    ("duplicate.csv", ["duplicate.csv has duplicate id 5 (rows 1 and 3)"]),
    ("binary.parquet", ["binary.parquet is not a valid Parquet file"]),
    ("binary.txt", ["line 1 of binary.txt is not UTF-8 text"]),
    ("null_text.parquet", ["row 2 of null_text.parquet has no 'text' value"]),
    ("duplicate.parquet", ["duplicate.parquet has duplicate id 'x' (rows 1 and 3)"]),
])
def test_data_file_checks_name_the_line_and_field(files, name, fragments):
    with pytest.raises(ValueError) as info:
        datasets_io.check_data_file(files / name)
    message = str(info.value)
    assert message.startswith("dataset.path: ") and "\n" not in message, message
    assert all(f in message for f in fragments), message


def test_data_file_check_passes_good_files_and_respects_limit(files):
    datasets_io.check_data_file(files / "good.jsonl")
    datasets_io.check_data_file(files / "no_text.jsonl", limit=2)             # line 3 is never used
    datasets_io.check_data_file(files / "duplicate.jsonl", id_column=None)
    with pytest.raises(ValueError, match="line 3"):
        datasets_io.check_data_file(files / "no_text.jsonl", limit=3)


@pytest.mark.parametrize("name, fragment", [
    ("binary.jsonl", "dataset.path: line 1 of binary.jsonl is not UTF-8 text"),
    ("duplicate.jsonl", "dataset.path: duplicate.jsonl has duplicate id 1 (lines 1 and 3)"),
    ("no_text.jsonl", "dataset.path: line 3 of no_text.jsonl has no 'text' field"),
])
def test_extract_checks_a_dataset_file_before_compute(files, name, fragment):
    assert fragment in spec_error("extract", f"dataset.path={files / name}")


def test_extract_checks_its_configured_text_column(files):
    message = spec_error("sae", f"dataset.path={files / 'good.jsonl'}", "extract.text_column=body")
    assert "line 1 of good.jsonl has no 'body' field" in message


def test_persuasion_checks_its_statements_file(files):
    path = files / "statements.jsonl"
    path.write_text('{"statement": "cats are good", "category": "pets"}\n{"statement": "x"}\n')
    assert "statements.path: line 2 of statements.jsonl has no 'category' field" in \
        spec_error("persuasion", f"statements.path={path}")


# ------------------------------------------------------------------------------------------ 6. models


@pytest.mark.parametrize("name, fragment", [
    ("truncated", "incomplete metadata, file not fully covered"),
    ("garbage", "header too large"),
    ("bad_header", "invalid JSON in header"),
    ("tiny", "header too small"),
])
def test_corrupt_safetensors_fail_before_compute(model_dirs, name, fragment):
    message = spec_error("extract", f"model.path={model_dirs[name]}", "extract.sites=[blocks.0.resid_post]")
    assert message.startswith(f"model.path: {model_dirs[name] / 'model.safetensors'} is not a valid safetensors "
                              "file (") and fragment in message, message
    assert message.endswith("re-save or re-download the model")


@pytest.mark.parametrize("name, fragment", [
    ("no_weights", "has a config.json but no weights"),
    ("missing_shard", "lacks weight shard(s) ['model-00002-of-00002.safetensors']"),
])
def test_model_folder_without_its_weights(model_dirs, name, fragment):
    assert fragment in spec_error("extract", f"model.path={model_dirs[name]}")


def test_intact_model_passes(model_dirs):
    models.check_model_source(str(model_dirs["good"]))
    spec = load_spec("extract", [f"model.path={model_dirs['good']}", "extract.sites=[blocks.0.resid_post]"],
                     check_store=False)
    assert spec.config.model.path == str(model_dirs["good"])


# ------------------------------------------------------------------------------------------- 7. serve


def test_served_model_id_is_a_name_not_a_local_path(model_dirs):
    from interpflow.actors.serve import build_app, default_served_name

    good = model_dirs["good"]
    assert default_served_name(str(good)) == "tiny-gpt2"
    assert default_served_name("openai-community/gpt2") == "openai-community/gpt2"
    init_args = build_app(str(good))._bound_deployment.init_args
    assert init_args[3] == "tiny-gpt2" and str(good) not in repr(init_args[1:])
    assert build_app(str(good), served_name="mine")._bound_deployment.init_args[3] == "mine"


# ------------------------------------------------------------------------ 8. the CLI, end to end (few)


CLI_CASES = {
    "binary_spec": (lambda f, m: [str(f / "binary.yaml")], "is not UTF-8 text"),
    "retry_exceptions": (lambda f, m: ["demo", "run.retry_exceptions=[NoSuchError]"], "run.retry_exceptions:"),
    "huge_size": (lambda f, m: ["demo", "numbers.n=1000000000000"], "numbers.n"),
    "negative_seed": (lambda f, m: ["demo", "numbers.seed=-1"], "numbers.seed"),
    "binary_dataset": (lambda f, m: ["extract", f"dataset.path={f / 'binary.jsonl'}"], "dataset.path: line 1"),
    "corrupt_model": (lambda f, m: ["extract", f"model.path={m['truncated']}", "extract.sites=[blocks.0.resid_post]"],
                      "is not a valid safetensors file"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_input_exits_2_with_one_stderr_line(case, files, model_dirs, tmp_path):
    args, fragment = CLI_CASES[case]
    store = tmp_path / "store"
    result = cli("run", *args(files, model_dirs), "--store", str(store), cwd=tmp_path, timeout=120)
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not store.exists()                       # nothing ran: no store, no Ray, no node


# ----------------------------------------------------------------------- 9. property: random specs


FUZZED = ["demo", "extract", "sae", "influence", "sae_bench", "human_study", "vcc", "persuasion"]
# string values at these keys would make validation look a model or dataset up on the Hub (network)
# or write a store somewhere: they get a local path that does not exist
LOOKUP_KEYS = {"path", "source", "revision", "store", "tracking_uri", "url", "base_url", "address"}


def _fields(model: type[BaseModel], prefix: str = "", depth: int = 0) -> list[tuple[str, typing.Any]]:
    """(dotted path, annotation) of every field of `model` and of its sub-models."""
    found = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        found.append((path, field.annotation))
        if depth < 5:
            for sub in _models_of(field.annotation):
                found.extend(_fields(sub, f"{path}.", depth + 1))
    return found


def _paths(workflow: str) -> list[tuple[str, typing.Any]]:
    from interpflow.workflows.engine.settings import RunSettings

    run = [("run", RunSettings)] + [(p, a) for p, a in _fields(RunSettings, "run.")
                                    if p.split(".")[-1] not in LOOKUP_KEYS]
    return sorted(set(_fields(workflow_builder(workflow)[1])) | set(run), key=lambda pa: pa[0])


def _no_lookups(key: str, value):
    if isinstance(value, dict):
        return {k: _no_lookups(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_lookups(key, v) for v in value]
    if key in LOOKUP_KEYS and isinstance(value, str):
        return f"/nonexistent-interpflow/{value.encode().hex()[:40]}"
    return value


def _yaml_text(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, allow_unicode=True, sort_keys=False)
    return text.removesuffix("\n...\n").rstrip("\n")


INTS = st.one_of(st.integers(min_value=-3, max_value=64), st.integers(min_value=-2**70, max_value=2**70),
                 st.sampled_from([0, -1, 2**31, 2**32, 2**63, -2**63, 10**12]))
FLOATS = st.one_of(st.floats(min_value=0, max_value=1), st.floats(allow_nan=True, allow_infinity=True))
WORDS = st.one_of(st.text(max_size=12), st.sampled_from(
    ["blocks.0.resid_post", "blocks.1.resid_post", "embed", "final_norm", "topk", "relu", "float16", "auto", "cpu",
     "", "~", ".", "a.b", "-1", "text", "id", "none", "mean", "all", "error"]))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, WORDS)
KEYS = st.one_of(st.text(max_size=8), st.integers(-3, 3), st.none(), st.booleans())  # YAML keys need not be str
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(KEYS, inner, max_size=3), max_leaves=8)
JUNK_PATHS = st.one_of(
    st.text(alphabet="abcdefghij_.", min_size=1, max_size=16),
    st.text(max_size=10),
)


def plausible(annotation) -> st.SearchStrategy:
    """Values of roughly the field's type (so that many random specs get past pydantic into the workflow's
    own checks), edge values included."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is typing.Annotated:
        return plausible(args[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return st.one_of([plausible(a) for a in args])
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return INTS
    if annotation is float:
        return st.one_of(FLOATS, INTS)
    if annotation is str:
        return WORDS
    if origin in (list, set, frozenset) and args:
        return st.lists(plausible(args[0]), max_size=4)
    if origin is tuple and args:
        return st.tuples(*[plausible(a) for a in args if a is not Ellipsis])
    if origin is dict and len(args) == 2:
        return st.dictionaries(WORDS, plausible(args[1]), max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        fields = list(annotation.model_fields.items())[:6]
        return st.fixed_dictionaries({}, optional={n: plausible(f.annotation) for n, f in fields})
    return VALUES


@st.composite
def overrides(draw, workflow: str) -> list[str]:
    paths = _paths(workflow)
    items = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 19))
        if kind == 19:                                      # anything at all, as typed on a command line
            items.append(draw(st.text(max_size=30)))
            continue
        if kind == 18:
            path, value = draw(JUNK_PATHS), draw(VALUES)
        else:
            path, annotation = draw(st.sampled_from(paths))
            value = draw(plausible(annotation) if kind < 14 else VALUES)
        key = path.split(".")[-1]
        raw = kind == 17 and key not in LOOKUP_KEYS
        items.append(f"{path}={draw(st.text(max_size=20)) if raw else _yaml_text(_no_lookups(key, value))}")
    return items


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> typing.Iterator[Path]:
    """A working directory for random specs; a model id that is no local path is looked up in the local hub
    cache only (HF_HUB_OFFLINE), never on the network."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield tmp_path_factory.mktemp("fuzz")


def _validates_or_one_line_spec_error(spec, items: list[str], scratch: Path) -> None:
    with contextlib.chdir(scratch):                   # a store named by the spec lands here
        try:
            loaded = load_spec(spec, [*items, f"run.store={scratch / 'store'}"])
        except SpecError as exc:
            message = str(exc)
            assert message and "\n" not in message and "\r" not in message, repr(message)
            return
    assert isinstance(loaded.config, BaseModel)


@pytest.mark.parametrize("workflow", FUZZED)
def test_random_overrides_validate_or_raise_one_line_spec_error(workflow, scratch):
    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(items=overrides(workflow))
    def check(items):
        _validates_or_one_line_spec_error(workflow, items, scratch)

    check()


@st.composite
def spec_dicts(draw) -> dict:
    workflow = draw(st.sampled_from(FUZZED))
    spec: dict = {"workflow": workflow} if draw(st.integers(0, 9)) else {"workflow": draw(VALUES)}
    for path, annotation in draw(st.lists(st.sampled_from(_paths(workflow)) | JUNK_PATHS.map(lambda p: (p, None)),
                                          max_size=4)):
        target = spec
        keys = path.split(".")
        for key in keys[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        value = draw(VALUES if annotation is None or draw(st.integers(0, 3)) == 0 else plausible(annotation))
        target[keys[-1]] = _no_lookups(keys[-1], value)
    if draw(st.integers(0, 4)) == 0:                        # a top-level key of any YAML type
        spec[draw(KEYS)] = _no_lookups("", draw(VALUES))
    return spec


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=spec_dicts())
def test_random_spec_dicts_validate_or_raise_one_line_spec_error(spec, scratch):
    _validates_or_one_line_spec_error(spec, [], scratch)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                         st.sampled_from([b"workflow: demo\n", b"- a\n- b\n", b"workflow: [\n", b"\xef\xbb\xbf"])))
def test_random_spec_files_validate_or_raise_one_line_spec_error(content, scratch):
    path = scratch / "random-spec.yaml"
    path.write_bytes(content)
    _validates_or_one_line_spec_error(str(path), [], scratch)
