"""Node keys: comments and docstrings don't count, code does; parts are explainable."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest

from interpflow.workflows.demo import DemoConfig, demo_graph
from interpflow.workflows.engine.keys import canonical_json, clear_source_cache, diff_parts, source_hash
from interpflow.workflows.engine.runner import plan_keys

MODULE = '''
def helper(x):
    return x + 1

def task(cfg, data):
    """Docstring v{doc}."""
    # a comment v{comment}
    return helper(data) * {factor}
'''


@pytest.fixture
def scratch_module(tmp_path, monkeypatch):
    """A real module file we can edit, imported under the project prefix so helpers count."""
    pkg = tmp_path / "interpflow_scratch"
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(doc=1, comment=1, factor=2, helper_add=1):
        src = MODULE.format(doc=doc, comment=comment, factor=factor).replace("x + 1", f"x + {helper_add}")
        pkg.mkdir(exist_ok=True)
        (pkg / "mod.py").write_text(textwrap.dedent(src))
        for name in [m for m in sys.modules if m.startswith("interpflow_scratch")]:
            del sys.modules[name]
        clear_source_cache()
        module = importlib.import_module("interpflow_scratch.mod")
        module.__name__ = "interpflow.scratch"  # count as project code for transitive hashing
        module.helper.__module__ = "interpflow.scratch"
        return module

    return write


def test_comment_and_docstring_edits_keep_the_key(scratch_module):
    base = source_hash(scratch_module().task)
    assert source_hash(scratch_module(comment=2).task) == base
    assert source_hash(scratch_module(doc=7).task) == base


def test_code_edits_change_the_key(scratch_module):
    base = source_hash(scratch_module().task)
    assert source_hash(scratch_module(factor=3).task) != base


def test_edit_in_a_called_project_function_changes_the_key(scratch_module):
    base = source_hash(scratch_module().task)
    assert source_hash(scratch_module(helper_add=5).task) != base


def test_canonical_json_is_order_independent():
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == canonical_json({"a": [1, {"c": 3, "d": 2}], "b": 1})


def test_config_change_changes_exactly_that_node_and_descendants():
    before = plan_keys(demo_graph(DemoConfig()))
    after = plan_keys(demo_graph(DemoConfig(histogram={"bins": 7})))
    changed = {name for name in before if before[name][0] != after[name][0]}
    assert changed == {"histogram", "report"}
    assert diff_parts(before["histogram"][1], after["histogram"][1]) == ["config.bins"]
    assert diff_parts(before["report"][1], after["report"][1]) == ["upstream.counts"]


def test_keys_are_stable_across_processes():
    """Keys must not depend on hash() seeds or object ids: recompute in a fresh interpreter."""
    import subprocess

    code = ("from interpflow.workflows.demo import DemoConfig, demo_graph;"
            "from interpflow.workflows.engine.runner import plan_keys;"
            "print(plan_keys(demo_graph(DemoConfig()))['report'][0])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": str(seed), "PATH": ""}, check=True).stdout.strip()
            for seed in (1, 2)}
    assert outs == {plan_keys(demo_graph(DemoConfig()))["report"][0]}


def test_a_name_only_assigned_to_is_no_dependency(tmp_path, monkeypatch):
    """pydantic's `model_config = ...` in a config class must not pull in a module function `model_config`."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def load(body: int):
        (tmp_path / "interpflow_assigned.py").write_text(textwrap.dedent(f'''
            def model_config(x):
                return x * {body}

            class Config:
                model_config = {{"extra": "forbid"}}

            def task(cfg):
                return Config()
            '''))
        sys.modules.pop("interpflow_assigned", None)
        clear_source_cache()
        module = importlib.import_module("interpflow_assigned")
        for obj in (module.model_config, module.Config, module.task):
            obj.__module__ = "interpflow.assigned"       # count as project code for transitive hashing
        monkeypatch.setitem(sys.modules, "interpflow.assigned", module)
        return module

    assert source_hash(load(2).task) == source_hash(load(3).task)


def _extract_keys(store, model, data) -> dict[str, str]:
    from interpflow.workflows.engine.runner import plan_keys
    from interpflow.workflows.spec import load_spec

    spec = load_spec({"workflow": "extract", "model": {"path": str(model)}, "dataset": {"path": str(data)},
                      "run": {"store": str(store)}}, check_store=False)
    return {name: key for name, (key, _) in plan_keys(spec.builder(spec.config)).items()}


def test_external_inputs_are_keyed_by_their_content_not_their_path(tmp_path, monkeypatch):
    """The byte-identical model and dataset at another path (another mount, another checkout, a relative
    spelling) give every node the same key; one changed weight changes the model and what reads it."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    first = tmp_path / "first"
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    model.save_pretrained(first / "model")
    (first / "data.jsonl").write_text("".join(json.dumps({"text": f"example {i}"}) + "\n" for i in range(8)))
    second = tmp_path / "elsewhere" / "second"
    shutil.copytree(first, second)

    keys = _extract_keys(tmp_path / "store", first / "model", first / "data.jsonl")
    assert {"dataset", "model", "activations", "report"} <= set(keys)
    assert _extract_keys(tmp_path / "store", second / "model", second / "data.jsonl") == keys
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert _extract_keys(tmp_path / "store", "second/model", "./second/data.jsonl") == keys

    with torch.no_grad():
        model.transformer.wte.weight[0, 0] += 1.0
    model.save_pretrained(second / "model")
    changed = _extract_keys(tmp_path / "store", second / "model", second / "data.jsonl")
    assert {name for name in keys if changed[name] != keys[name]} == {"model", "activations", "report"}
