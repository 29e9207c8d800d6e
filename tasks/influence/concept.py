"""The concept direction v that Concept Influence attributes, fitted per site from labelled activations.

Per site: a logistic probe of the label on mean-pooled activations (held-out accuracy says whether
the concept is linearly readable there) and the concept direction itself, either the difference
of the class means (``mean_difference``, the default: the persona-vector recipe, which does not
depend on which of many separating hyperplanes a regularised fit lands on) or the probe's unit
weight vector (``probe``). Both point from label 0 to label 1.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.activations import pooled
from interpflow.tasks.probes import ProbeConfig, fit_probe, layer_sweep


class ConceptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    site: str = Field("final_norm", description="site of the concept direction used for attribution")
    direction: str = Field("mean_difference", pattern="^(mean_difference|probe)$",
                           description="mean_difference (class means) or probe (logistic weight)")
    probe: ProbeConfig = ProbeConfig()
    label_column: str = "label"
    id_column: str = "id"
    max_examples: int = Field(100_000, ge=2, description="pooled examples read per site")


def fit_concept(cfg: ConceptConfig, activations, data) -> dict:
    """Graph node: the probe and the unit concept direction at one site (``activations``: that site's
    mean-pooled rows, one per example)."""
    ids, x = pooled(activations, cfg.max_examples)
    if len(ids) == 0:
        raise ValueError("concept: no activations to fit on (the probe set is empty)")
    label_of = dict(zip((int(i) for i in data[cfg.id_column]), (int(v) for v in data[cfg.label_column])))
    y = np.array([label_of[int(i)] for i in ids])
    if set(np.unique(y)) != {0, 1}:
        raise ValueError(f"concept: labels must be 0 and 1 (got {sorted(set(np.unique(y)))}); the direction "
                         "points from label 0 to label 1")
    result = fit_probe(cfg.probe, x, y)
    if cfg.direction == "mean_difference":
        v = x[y == 1].mean(0) - x[y == 0].mean(0)
    else:
        v = result.weight[0]
    v = v / max(np.linalg.norm(v), 1e-12)
    tensors, meta = result.to_tensors()
    separation = float((x[y == 1] @ v).mean() - (x[y == 0] @ v).mean())
    from interpflow.tasks.sae.vectors import vector_card

    schema_meta = getattr(getattr(activations, "schema", None), "metadata", None) or {}
    card = vector_card({"direction": v}, kind="probe_direction", name=cfg.label_column, sites={"direction": cfg.site},
                       model=json.loads(schema_meta[b"model"]) if b"model" in schema_meta else None,
                       fitted={"method": cfg.direction, "probe": cfg.probe.model_dump(mode="json"),
                               "examples": len(ids), "held_out_accuracy": result.value,
                               "points": "from label 0 to label 1"})
    return {"direction": {"direction": torch.from_numpy(np.ascontiguousarray(v)), "probe_weight": tensors["weight"],
                          "probe_bias": tensors["bias"]},
            "card": card, "probe": meta,
            "metrics": {"probe_accuracy": result.value, "probe_train_accuracy": result.train_value,
                        "separation": separation, "examples": len(ids), "width": int(x.shape[1])}}


def concept_sweep(cfg: BaseModel | None = None, **probes: dict) -> dict:
    """Graph node: held-out probe accuracy per site (table + the metric-vs-depth plot); ``probes``
    maps each site to its concept node's ``probe`` output."""
    results = {site: SimpleNamespace(metric=m["metric"], value=float(m["value"]), n_test=int(m["n_test"]))
               for site, m in probes.items()}
    table, figure = layer_sweep(results)
    return {"sweep": table, "figure": figure, "metrics": {f"accuracy.{site}": r.value for site, r in results.items()}}


class VectorFile(BaseModel):
    """A concept direction given as a file (an SAE feature's atom, a steering vector, ...)."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., description="safetensors file with one 1-D tensor (or one named 'direction')")


def read_direction(path: str) -> torch.Tensor:
    """The unit direction of a vectors file (its 'direction' tensor or its one tensor, as
    ``tasks.sae.vectors`` writes persona vectors, CAVs and SAE latents); ValueError says what is wrong."""
    from interpflow.tasks.sae.vectors import one_direction

    return one_direction(path, "concept_vector.path")


def given_concept(cfg: VectorFile) -> dict:
    """Graph node: a user-given concept direction in the form fit_concept stores."""
    return {"direction": {"direction": read_direction(cfg.path)}}
