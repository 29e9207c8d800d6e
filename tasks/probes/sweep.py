"""Probe scores across depth: one row per site, and the metric-vs-depth figure."""

from __future__ import annotations

from typing import Callable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402

from interpflow.tasks.probes.linear import ProbeResult  # noqa: E402
from interpflow.tasks.sites import depth_order as site_depth_order  # noqa: E402


def layer_sweep(results: Mapping[str, ProbeResult], depth_order: Callable[[str], object] = site_depth_order,
                ) -> tuple[pa.Table, "plt.Figure"]:
    """Table (site, metric, value, n_test) in model order and a figure of the held-out metric per site.

    Sites are ordered by ``depth_order`` (default: ``interpflow.tasks.sites.depth_order``, which puts
    ``embed`` first, ``blocks.I.*`` by I and ``final_norm`` last). Each metric gets its own line, so a
    sweep mixing probe kinds still plots one point per site.
    """
    if not results:
        raise ValueError("layer_sweep got no results; pass {site name: ProbeResult}")
    sites = sorted(results, key=depth_order)
    table = pa.table({"site": sites,
                      "metric": [results[s].metric for s in sites],
                      "value": pa.array([float(results[s].value) for s in sites], pa.float64()),
                      "n_test": pa.array([int(results[s].n_test) for s in sites], pa.int64())})
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(sites) + 2), 3.5))
    for metric in dict.fromkeys(results[s].metric for s in sites):
        pos = [i for i, s in enumerate(sites) if results[s].metric == metric]
        ax.plot(pos, [results[sites[i]].value for i in pos], marker="o", label=metric)
    ax.set_xticks(range(len(sites)))
    ax.set_xticklabels(sites, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("site (by depth)")
    ax.set_ylabel("held-out metric")
    ax.legend()
    fig.tight_layout()
    return table, fig
