"""Directions in the open: steering vectors, persona vectors, CAVs, probe directions and SAE latents as
one safetensors file plus a small JSON card beside it.

    vectors.safetensors   {canonical site name: 1-D float32 tensor}    (one ``load_file`` call)
    vectors.json          the card: what the vectors are and how they were fitted

The card (also copied into the safetensors header's metadata, so the file alone carries it)::

    {"format": "interpflow.vectors/1", "kind": "persona_vector", "name": "persuasive",
     "model": {"source": "...", "digest": "..."},
     "vectors": {"blocks.3.resid_post": {"site": "blocks.3.resid_post",
                                         "transformer_lens": "blocks.3.hook_resid_post",
                                         "norm": 2.7, "d": 64}},
     "fitted": {"method": "difference of kept response means", ...}}

Tensor keys are canonical site names; a file keyed by TransformerLens hook names reads the same
(``read_vectors`` maps them), and a file whose one tensor is named ``direction`` (the older concept-
vector layout) is read as that one direction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "interpflow.vectors/1"


def card_path(path: str | Path) -> Path:
    """The JSON card beside a vectors file (``x.safetensors`` -> ``x.json``)."""
    return Path(path).with_suffix(".json")


def _tensors(vectors: dict[str, Any], sites: dict[str, str] | None) -> tuple[dict, dict]:
    from interpflow.tasks.sites import UnknownSite, canonical_name, tl_alias

    tensors, entries = {}, {}
    for key, value in vectors.items():
        site = (sites or {}).get(key, key)
        try:
            site = canonical_name(site)
        except UnknownSite:
            pass
        key = site if sites is None or key not in sites else key
        t = torch.as_tensor(np.asarray(value, dtype=np.float32)).reshape(-1).clone()   # own memory per key
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"vector {key!r} has NaN/Inf entries; not written")
        tensors[key] = t
        entries[key] = {"site": site, "transformer_lens": tl_alias(site), "norm": float(t.norm()), "d": int(t.numel())}
    if not tensors:
        raise ValueError("no vectors given")
    return tensors, entries


def vector_card(vectors: dict[str, Any], *, kind: str, name: str = "", model: dict | None = None,
                fitted: dict | None = None, sites: dict[str, str] | None = None) -> dict:
    """The card of ``{key: 1-D vector}``: keys are site names unless ``sites`` maps a key (a concept's
    name) to the site its vector lives at. ``kind`` says what the vectors are (persona_vector, cav,
    probe_direction, sae_latent, ...), ``model`` the model they live in (source, weight digest),
    ``fitted`` how they were made (method and its settings, counts, seeds)."""
    _, entries = _tensors(vectors, sites)
    return {"format": FORMAT, "kind": kind, "name": name, "model": dict(model or {}), "vectors": entries,
            "fitted": dict(fitted or {})}


def write_vectors(path: str | Path, vectors: dict[str, Any], *, kind: str, name: str = "",
                  model: dict | None = None, fitted: dict | None = None, sites: dict[str, str] | None = None) -> dict:
    """Write ``{key: 1-D vector}`` as safetensors (the card in its header too) and the card as JSON
    beside it (``vector_card`` says what the arguments mean); return the card."""
    from safetensors.torch import save_file

    tensors, _ = _tensors(vectors, sites)
    card = vector_card(vectors, kind=kind, name=name, model=model, fitted=fitted, sites=sites)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"card": json.dumps(card, sort_keys=True)})
    card_path(path).write_text(json.dumps(card, indent=1, sort_keys=True))
    return card


def read_card(path: str | Path) -> dict | None:
    """The card of a vectors file: the JSON beside it, else the copy in its header, else None."""
    beside = card_path(path)
    if beside.is_file() and beside != Path(path):
        return json.loads(beside.read_text())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["card"]) if "card" in meta else None


def read_vectors(path: str | Path, field: str = "path") -> dict[str, torch.Tensor]:
    """``{canonical site name: 1-D float tensor}`` of a vectors file; ValueError names ``field`` and
    what is wrong (missing file, not safetensors, a tensor that is not 1-D or not finite)."""
    from safetensors.torch import load_file

    from interpflow.tasks.sites import UnknownSite, canonical_name

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # missing file, not safetensors
        raise ValueError(f"{field}: cannot read {str(path)!r} as safetensors ({exc})") from None
    out = {}
    for key, t in tensors.items():
        if t.ndim != 1:
            raise ValueError(f"{field}: tensor {key!r} in {str(path)!r} has shape {tuple(t.shape)}; vectors are 1-D")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{field}: tensor {key!r} in {str(path)!r} has NaN/Inf entries")
        try:
            key = canonical_name(key)
        except UnknownSite:
            pass
        out[key] = t.float()
    if not out:
        raise ValueError(f"{field}: {str(path)!r} holds no tensor")
    return out


def one_direction(path: str | Path, field: str = "concept_vector.path", site: str | None = None) -> torch.Tensor:
    """The single direction of a vectors file (its ``direction`` tensor, its one tensor, or the one at
    ``site``), as a unit float64 vector."""
    vectors = read_vectors(path, field)
    if "direction" in vectors:
        v = vectors["direction"]
    elif site is not None and site in vectors:
        v = vectors[site]
    elif len(vectors) == 1:
        v = next(iter(vectors.values()))
    else:
        raise ValueError(f"{field}: {str(path)!r} holds {len(vectors)} vectors ({sorted(vectors)}); name the one to "
                         f"use by its site, or give a file with one")
    v = v.double()
    if float(v.norm()) == 0:
        raise ValueError(f"{field}: the direction in {str(path)!r} is zero or has NaN/Inf entries")
    return v / v.norm()
