"""Submit a spec to a Ray cluster through the Ray Jobs SDK.

The job's `submission_id` is derived from the spec, so submitting the same spec twice attaches to
the job already there instead of starting a second one. The package travels as the contents of
its wheel in the job's runtime env (`py_modules`), the spec in its `working_dir`. Token auth: the Jobs client sends
the cluster token from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token when auth is on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from interpflow.workflows.engine.keys import canonical_json
from interpflow.workflows.spec import Spec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class Submission:
    submission_id: str
    status: str
    attached: bool


def submission_id_for(spec: Spec) -> str:
    """Stable job id: the workflow name and a digest of the whole spec after overrides."""
    digest = hashlib.sha256(canonical_json(spec.raw).encode()).hexdigest()[:16]
    return f"interpflow-{spec.workflow}-{digest}"


def build_package(dest: Path) -> Path:
    """This checkout's package as the `interpflow/` folder of its wheel.

    A `.whl` in `py_modules` is pip-installed with all its dependencies on every node (minutes, and
    it may pull another torch); the unpacked folder ships the same files and leaves the cluster
    image's dependencies alone.
    """
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dest), str(PROJECT_ROOT)], check=True, capture_output=True, text=True)
    wheel = next(dest.glob("interpflow-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(dest / "unpacked")
    return dest / "unpacked" / "interpflow"


def cluster_auth_headers() -> dict[str, str]:
    """The bearer header for a token-auth cluster, from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token (where `ray start` writes it). Empty if no token is at hand.

    Passed explicitly because Ray's own client only adds it when RAY_AUTH_MODE=token was set before
    `import ray`, which a notebook or test process cannot promise.
    """
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.exists():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def jobs_client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=cluster_auth_headers())


def _submit_when_ready(client, timeout_s: float, **job) -> None:
    """Submit, waiting out a head whose job agent is still starting (the Jobs API answers 500
    "No available agent" for a few seconds after `ray start`, longer on a loaded machine)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2.0)


def submit_spec(spec: Spec, address: str, wait: bool = True, timeout_s: float = 1800,
                echo: Callable[[str], None] = print) -> Submission:
    client = jobs_client(address)
    sid = submission_id_for(spec)
    try:
        status = str(client.get_job_status(sid).value)
        attached = True
        echo(f"job {sid} exists ({status}); attaching instead of submitting again")
    except RuntimeError:  # the Jobs API answers 404 for an unknown id
        attached = False
        staging = Path(tempfile.mkdtemp(prefix="interpflow-submit-"))
        try:
            workdir = staging / "job"
            workdir.mkdir()
            (workdir / "spec.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
            package = build_package(staging / "wheel")
            _submit_when_ready(client, timeout_s=120,
                               entrypoint="python -m interpflow.workflows.cli run spec.yaml --no-progress",
                               submission_id=sid,
                               runtime_env={"working_dir": str(workdir), "py_modules": [str(package)]},
                               metadata={"interpflow_workflow": spec.workflow})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        echo(f"submitted job {sid}")
        status = "PENDING"
    if wait:
        deadline = time.time() + timeout_s
        while status not in TERMINAL and time.time() < deadline:
            time.sleep(1.0)
            status = str(client.get_job_status(sid).value)
        if status == "FAILED":
            echo(client.get_job_logs(sid)[-4000:])
    return Submission(sid, status, attached)
