"""Linear probes (logistic, ridge, circular) and their sweep across depth."""

from interpflow.tasks.probes.crossval import (CV_METRICS, CVConfig, CVResult, EmergenceConfig, LayerProbeConfig,
                                              circular_score, cv_probe, depth_figure, depth_table, emergence,
                                              grouped_folds, permute_by_group, probe_layer, shuffled_control)
from interpflow.tasks.probes.geometry import (GeometryConfig, circular_correlation, geometry_report,
                                              orthogonal_probe_dimensionality, planted_ring, principal_angles,
                                              ring_figure, ring_geometry, signal_subspace)
from interpflow.tasks.probes.linear import METRICS, ProbeConfig, ProbeKind, ProbeResult, fit_probe
from interpflow.tasks.probes.sweep import layer_sweep

__all__ = ["METRICS", "GeometryConfig", "ProbeConfig", "ProbeKind", "ProbeResult", "circular_correlation",
           "fit_probe", "geometry_report", "layer_sweep", "orthogonal_probe_dimensionality", "planted_ring",
           "principal_angles", "ring_figure", "ring_geometry", "signal_subspace",
           "CV_METRICS", "CVConfig", "CVResult", "EmergenceConfig", "LayerProbeConfig", "circular_score",
           "cv_probe", "depth_figure", "depth_table", "emergence", "grouped_folds", "permute_by_group",
           "probe_layer", "shuffled_control"]
