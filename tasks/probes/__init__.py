"""Linear probes (logistic, ridge, circular) and their sweep across depth."""

from interpflow.tasks.probes.linear import METRICS, ProbeConfig, ProbeKind, ProbeResult, fit_probe
from interpflow.tasks.probes.sweep import layer_sweep

__all__ = ["METRICS", "ProbeConfig", "ProbeKind", "ProbeResult", "fit_probe", "layer_sweep"]
