"""interpflow: interpretability and AI-safety research workflows as durable DAGs on Ray.

The notebook API lives here; the CLI (``interpflow``) is a thin layer over it.
"""

from interpflow.workflows.api import RunHandle, load_spec, open_run, resume, run, verify

__all__ = ["RunHandle", "load_spec", "open_run", "resume", "run", "verify"]
