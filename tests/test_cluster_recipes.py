"""The cluster recipes validate (issue #31, point 8): `cluster/cluster.yaml` against the cluster-launcher
schema shipped inside the installed `ray` package, `cluster/rayjob.yaml` against the project's own schema of
KubeRay's RayJob CRD v1 (`cluster/rayjob.schema.json`), and both say what the README's recipe says: the Ray
version the project runs, autoscaling bounds, token auth, GCS fault tolerance, a shared store and a tracking
server. Each check is shown to fail on a broken copy. No cluster starts."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from interpflow.cluster.submit import resolve_for_cluster
from interpflow.workflows.spec import load_spec, parse_yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHER_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


@pytest.fixture(scope="module")
def launcher():
    return jsonschema.Draft7Validator(json.loads(LAUNCHER_SCHEMA.read_text()))


@pytest.fixture(scope="module")
def rayjob_schema():
    schema = json.loads((CLUSTER / "rayjob.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator, document) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def _launcher_problems(validator, config: dict) -> list[str]:
    """The schema's errors and what `ray up` checks beyond it (head type declared, worker bounds)."""
    problems = _errors(validator, config)
    types = config.get("available_node_types") or {}
    if config.get("head_node_type") not in types:
        problems.append(f"head_node_type {config.get('head_node_type')!r} is not in available_node_types")
    for name, node_type in types.items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", config.get("max_workers", 0))
        if not all(isinstance(n, int) for n in (low, high, config.get("max_workers", high))):
            continue  # the schema said so already
        if not 0 <= low <= high <= config.get("max_workers", high):
            problems.append(f"{name}: min_workers {low} / max_workers {high} outside 0..{config.get('max_workers')}")
    return problems


def _rayjob_problems(validator, job: dict) -> list[str]:
    """The schema's errors and what no JSON schema can say: minReplicas <= replicas <= maxReplicas."""
    problems = _errors(validator, job)
    for group in ((job.get("spec") or {}).get("rayClusterSpec") or {}).get("workerGroupSpecs") or []:
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        replicas = group.get("replicas", low)
        if all(isinstance(n, int) for n in (low, high, replicas)) and not low <= replicas <= high:
            problems.append(f"{group.get('groupName')}: replicas outside minReplicas..maxReplicas")
    return problems


def _cluster_config() -> dict:
    return yaml.safe_load((CLUSTER / "cluster.yaml").read_text())


def _rayjob_documents() -> tuple[dict, dict]:
    job, config_map = yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text())
    return job, config_map


def test_cluster_yaml_is_a_valid_launcher_config(launcher):
    config = _cluster_config()
    assert _launcher_problems(launcher, config) == []
    # the same token on every node, and every `ray start` told to use it
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and "~/.ray/auth_token" in config["file_mounts"].values()
    assert f'ray[default]=={ray.__version__}' in " ".join(config["setup_commands"])


@pytest.mark.parametrize("breakage", ["misspelt key", "wrong type", "unknown head type", "min over max"])
def test_the_launcher_check_fails_on_a_broken_config(launcher, breakage):
    config = copy.deepcopy(_cluster_config())
    if breakage == "misspelt key":
        config["max_worker"] = config.pop("max_workers")
    elif breakage == "wrong type":
        config["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    elif breakage == "unknown head type":
        config["head_node_type"] = "head_node"
    else:
        config["available_node_types"]["gpu_worker"]["min_workers"] = 9
    assert _launcher_problems(launcher, config)


def test_rayjob_yaml_is_a_valid_rayjob_running_the_spec_on_shared_storage(rayjob_schema):
    job, config_map = _rayjob_documents()
    assert _rayjob_problems(rayjob_schema, job) == []
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token" and cluster["enableInTreeAutoscaling"] is True
    assert cluster["gcsFaultToleranceOptions"]["redisAddress"]
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert job["spec"]["backoffLimit"] >= 1  # a failed attempt is retried, resuming from the store
    # the entrypoint's spec is the ConfigMap's, mounted on the head, where the driver runs
    spec_path = re.search(r"(/\S+\.yaml)", job["spec"]["entrypoint"]).group(1)
    head = cluster["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volume = next(v for v in head["volumes"] if v["configMap"]["name"] == config_map["metadata"]["name"])
    assert spec_path == f"{mounts[volume['name']]}/{os.path.basename(spec_path)}"
    spec = load_spec(parse_yaml(config_map["data"][os.path.basename(spec_path)]), check_store=False)
    assert spec.settings.store.startswith("s3://") and spec.settings.tracking_uri.startswith("http://")
    assert resolve_for_cluster(spec, "http://head.invalid:8265")["run"]["store"] == spec.settings.store


@pytest.mark.parametrize("breakage", ["misspelt field", "missing maxReplicas", "number in rayStartParams",
                                      "unknown auth mode", "no headGroupSpec", "replicas over max", "wrong kind"])
def test_the_rayjob_check_fails_on_a_broken_manifest(rayjob_schema, breakage):
    job = copy.deepcopy(_rayjob_documents()[0])
    cluster = job["spec"]["rayClusterSpec"]
    worker = cluster["workerGroupSpecs"][0]
    if breakage == "misspelt field":
        cluster["headGroupSpec"]["rayStartParam"] = cluster["headGroupSpec"].pop("rayStartParams")
    elif breakage == "missing maxReplicas":
        del worker["maxReplicas"]
    elif breakage == "number in rayStartParams":
        cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    elif breakage == "unknown auth mode":
        cluster["authOptions"]["mode"] = "password"
    elif breakage == "no headGroupSpec":
        del cluster["headGroupSpec"]
    elif breakage == "replicas over max":
        worker["replicas"] = worker["maxReplicas"] + 1
    else:
        job["kind"] = "RayCluster"
    assert _rayjob_problems(rayjob_schema, job), breakage


def test_the_rayjob_schema_is_the_projects_own_not_a_copy_of_the_crd():
    text = (CLUSTER / "rayjob.schema.json").read_text()
    assert "openAPIV3Schema" not in text and "x-kubernetes" not in text and len(text) < 20_000
