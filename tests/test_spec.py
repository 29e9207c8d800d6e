"""Bad input exits with code 2 and one message naming the field and the fix, before Ray starts."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from interpflow.workflows.cli import app
from interpflow.workflows.spec import SpecError, apply_overrides, load_spec


def run_cli(*args):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def spec_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


CASES = {
    "malformed_yaml": ("workflow: demo\nnumbers: {n: 10\n", [], ["malformed YAML", "line 3"]),
    "unknown_field": ("workflow: demo\nnumbrs: {n: 10}\n", [], ["unknown field 'numbrs'", "numbers"]),
    "unknown_nested_field": ("workflow: demo\n", ["numbers.nn=3"], ["unknown field 'numbers.nn'", "n, seed"]),
    "wrong_type": ("workflow: demo\nnumbers: {n: many}\n", [], ["numbers.n", "valid integer", "Fix"]),
    "out_of_range": ("workflow: demo\n", ["num_shards=0"], ["num_shards", "greater than or equal to 1"]),
    "unknown_workflow": ("workflow: dmo\n", [], ["unknown workflow 'dmo'", "demo"]),
    "no_workflow": ("numbers: {n: 3}\n", [], ["names no workflow", "workflow: NAME"]),
    "unreachable_store": ("workflow: demo\nrun: {store: /proc/interpflow-nope}\n", [], ["run.store", "not writable"]),
    "bad_override": ("workflow: demo\n", ["numbers.n"], ["FIELD=VALUE"]),
    "bad_run_setting": ("workflow: demo\nrun: {max_retries: -1}\n", [], ["run.max_retries"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_field_and_fix(case, spec_dir):
    import ray

    text, overrides, expected = CASES[case]
    (spec_dir / "spec.yaml").write_text(text)
    code, output = run_cli("run", "spec.yaml", *overrides)
    assert code == 2, output
    flat = " ".join(output.split())
    for fragment in expected:
        assert fragment in flat, (fragment, output)
    assert flat.count("error:") == 1
    assert not ray.is_initialized()


def test_missing_spec_file_names_bundled_specs(spec_dir):
    code, output = run_cli("run", "no-such-spec.yaml")
    assert code == 2 and "demo" in output


def test_overrides_parse_yaml_values():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=64", "a.c=true", "d=[1, 2]", "e.f.g=x"])
    assert data == {"a": {"b": 64, "c": True}, "d": [1, 2], "e": {"f": {"g": "x"}}}


def test_valid_spec_loads_typed_config(spec_dir):
    spec = load_spec("demo", ["transform.power=3", f"run.store={spec_dir / 's'}"])
    assert spec.config.transform.power == 3 and spec.workflow == "demo"
    assert spec.settings.store.endswith("/s")


def test_spec_error_is_a_value_error():
    with pytest.raises(SpecError):
        load_spec({"workflow": "demo", "transform": {"power": "x"}}, check_store=False)
