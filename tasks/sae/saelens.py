"""SAEs in the SAELens layout, both ways, so a trained SAE goes where researchers already work.

A SAELens folder (``SAE.load_from_disk(folder)`` in sae-lens >= 6) is three files:

    cfg.json                  architecture, d_in, d_sae, dtype, apply_b_dec_to_input, normalize_activations,
                              reshape_activations, k (topk), metadata {hook_name, hook_head_index, model_name, ...}
    sae_weights.safetensors   W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in),
                              threshold (d_sae; jumprelu)
    sparsity.safetensors      sparsity: log10 of each latent's firing frequency (d_sae)

SAELens computes ``codes = act((x - b_dec) @ W_enc + b_enc)`` and ``x_hat = codes @ W_dec + b_dec``
in raw units. Ours multiplies inputs by ``input_scale`` s first (``base.py``), so the export folds s
in: W_enc' = s W_enc, W_dec' = D / s, b_dec' = b_dec / s (b_enc and thresholds unchanged); codes are
identical and reconstructions equal to float rounding.

Architectures: relu -> ``standard``, topk -> ``topk``, jumprelu -> ``jumprelu``, batchtopk ->
``jumprelu`` with every latent's threshold at the global inference threshold (what SAELens itself
saves for BatchTopK). Archetypal, relaxed archetypal and universal SAEs have no SAELens architecture:
they are written in the project's own layout in the same spirit (``cfg.json`` with
``architecture: interpflow.<variant>`` and the project's config, ``sae_weights.safetensors`` with the
model's state dict, ``sparsity.safetensors``), and ``load_folder`` reads both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .base import SAEConfig, SparseAutoencoder, make_sae

CFG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
SAELENS_ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
READS = ("standard", "topk", "jumprelu", "batchtopk")          # SAELens architectures load_folder reads
OWN_PREFIX = "interpflow."
SAELENS_CFG_VERSION = "6.0.0"                                  # the cfg.json layout of sae-lens >= 6


def _sparsity(model: SparseAutoencoder) -> torch.Tensor:
    rows = max(int(model.rows_seen), 1)
    return torch.log10(model.fire_count.double() / rows + 1e-10).float()


def saelens_tensors(model: SparseAutoencoder) -> tuple[str, dict[str, torch.Tensor], dict]:
    """(SAELens architecture, weights, extra cfg fields) of a model with a SAELens architecture."""
    variant = model.cfg.variant
    if variant not in SAELENS_ARCHITECTURE:
        raise ValueError(f"variant {variant!r} has no SAELens architecture; write it with save_folder (own layout)")
    s = float(model.input_scale)
    with torch.no_grad():
        tensors = {"W_enc": model.W_enc * s, "b_enc": model.b_enc.clone(), "W_dec": model.dictionary() / s,
                   "b_dec": model.b_dec / s}
        extra: dict = {}
        if variant == "topk":
            extra["k"] = model.cfg.k
        if variant == "jumprelu":
            tensors["threshold"] = model.threshold.clone()
        if variant == "batchtopk":
            if float(model.threshold) < 0:
                raise ValueError("BatchTopK inference threshold is not estimated yet; train the SAE first")
            tensors["threshold"] = torch.full_like(model.b_enc, float(model.threshold))
    return SAELENS_ARCHITECTURE[variant], {k: v.detach().float().contiguous() for k, v in tensors.items()}, extra


def save_folder(model: SparseAutoencoder, folder: str | Path, *, hook_name: str = "", site: str = "",
                model_name: str = "", head: int | None = None, metadata: dict | None = None) -> Path:
    """Write ``model`` as a SAELens folder (its variant has a SAELens architecture) or in the project's
    own layout (archetypal variants). ``hook_name`` is the TransformerLens name of the site, ``site``
    the project's; both go into ``metadata`` (with ``hook_head_index`` for a head site)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"sae_lens_version": SAELENS_CFG_VERSION, "sae_lens_training_version": None, "hook_name": hook_name,
            "hook_head_index": head, "model_name": model_name, "interpflow_site": site,
            "interpflow_variant": model.cfg.variant, "prepend_bos": True, **(metadata or {})}
    cfg = {"d_in": model.cfg.d_in, "d_sae": model.cfg.n_latents, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none"}
    if model.cfg.variant in SAELENS_ARCHITECTURE:
        architecture, tensors, extra = saelens_tensors(model)
        cfg.update(extra)
    else:
        architecture = OWN_PREFIX + model.cfg.variant
        tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        cfg["interpflow_config"] = model.cfg.model_dump(mode="json")
    cfg.update({"architecture": architecture, "metadata": meta})
    save_file(tensors, str(folder / WEIGHTS))
    save_file({"sparsity": _sparsity(model)}, str(folder / SPARSITY))
    (folder / CFG).write_text(json.dumps(cfg, indent=1))
    return folder


UNIVERSAL = OWN_PREFIX + "universal"


def save_universal_folder(model, folder: str | Path, *, sites: list[str] | None = None,
                          metadata: dict | None = None) -> Path:
    """Write a Universal SAE (``universal.UniversalSAE``) in the project's own layout, in the SAELens spirit:
    ``cfg.json`` (architecture ``interpflow.universal``, ``d_ins`` one width per model, ``d_sae``, the model
    names and their sites in ``metadata``, the full config), ``sae_weights.safetensors`` (its state dict:
    ``W_enc.M``, ``W_dec.M``, ... per model M) and ``sparsity.safetensors`` (log10 firing frequency per source
    model, shape (models, d_sae)). ``load_universal_folder`` reads it back."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = model.cfg.names
    meta = {"sae_lens_version": SAELENS_CFG_VERSION, "model_names": names, "interpflow_sites": list(sites or []),
            "interpflow_variant": "universal", **(metadata or {})}
    cfg = {"architecture": UNIVERSAL, "d_ins": list(model.cfg.d_ins), "d_sae": model.cfg.n_latents,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "interpflow_config": model.cfg.model_dump(mode="json"), "metadata": meta}
    rows = model.rows_seen.double().clamp_min(1)[:, None]
    sparsity = torch.log10(model.fire_count.double() / rows + 1e-10).float()
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    save_file({"sparsity": sparsity}, str(folder / SPARSITY))
    (folder / CFG).write_text(json.dumps(cfg, indent=1))
    return folder


def load_universal_folder(folder: str | Path, field: str = "sae.path"):
    """A folder ``save_universal_folder`` wrote, as a ``UniversalSAE`` in eval mode."""
    from safetensors.torch import load_file

    from .universal import UniversalSAE, UniversalSAEConfig

    cfg = read_cfg(folder, field)
    if cfg["architecture"] != UNIVERSAL:
        raise ValueError(f"{field}: '{folder}' holds a {cfg['architecture']!r} SAE, not a Universal SAE; "
                         f"load it with load_folder")
    model = UniversalSAE(UniversalSAEConfig(**cfg["interpflow_config"]))
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    return model.eval()


def read_cfg(folder: str | Path, field: str = "sae.path") -> dict:
    """A folder's cfg.json, checked: its architecture is one we read and its settings are ones we model."""
    folder = Path(folder)
    path = folder / CFG
    if not path.is_file():
        raise ValueError(f"{field}: no {CFG} in '{folder}'; give a SAELens folder (cfg.json, sae_weights.safetensors)")
    if not (folder / WEIGHTS).is_file():
        raise ValueError(f"{field}: no {WEIGHTS} in '{folder}'")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{field}: '{path}' is not valid JSON ({exc})") from None
    arch = cfg.get("architecture", "standard")
    if arch not in READS and not str(arch).startswith(OWN_PREFIX):
        raise ValueError(f"{field}: unknown architecture {arch!r} in '{path}'; readable: {', '.join(READS)} "
                         f"(SAELens) and {OWN_PREFIX}<variant> (this project's own layout)")
    for key, ok in (("normalize_activations", ("none", None)), ("reshape_activations", ("none", None)),
                    ("rescale_acts_by_decoder_norm", (False, None)), ("apply_b_dec_to_input", (True, None))):
        if cfg.get(key) not in ok:
            raise ValueError(f"{field}: {key}={cfg.get(key)!r} in '{path}' is not supported (only {ok[0]!r}); "
                             f"fold it into the weights first")
    if arch == UNIVERSAL:
        widths = cfg.get("d_ins")
        if not isinstance(widths, list) or not widths or not all(isinstance(d, int) and d >= 1 for d in widths):
            raise ValueError(f"{field}: '{path}' needs d_ins, a list of positive integers (one width per model), "
                             f"got {widths!r}")
    for key in (("d_sae",) if arch == UNIVERSAL else ("d_in", "d_sae")):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"{field}: '{path}' needs a positive integer {key}, got {cfg.get(key)!r}")
    return cfg


class SaeFolder(BaseModel):
    """An SAE trained elsewhere (a SAELens folder) or exported here, to evaluate instead of training."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., description="a folder with cfg.json + sae_weights.safetensors (SAELens layout, or this "
                                       "project's own for archetypal variants)")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:          # read by a worker whose working directory may differ
        return str(Path(value).expanduser().resolve())


def load_folder(folder: str | Path, field: str = "sae.path") -> SparseAutoencoder:
    """A SAELens (or own-layout) folder as this project's SAE, in eval mode: same codes, same reconstructions."""
    from safetensors.torch import load_file

    cfg = read_cfg(folder, field)
    tensors = load_file(str(Path(folder) / WEIGHTS))
    arch = cfg.get("architecture", "standard")
    if arch == UNIVERSAL:
        raise ValueError(f"{field}: '{folder}' is a Universal SAE over {len(cfg['d_ins'])} models "
                         f"({', '.join(cfg.get('metadata', {}).get('model_names', []))}); this takes a one-model SAE. "
                         f"Load it in Python with tasks.sae.saelens.load_universal_folder")
    if arch.startswith(OWN_PREFIX):
        model = make_sae(SAEConfig(**cfg["interpflow_config"]))
        model.load_state_dict(tensors)
        return model.eval()
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in tensors]
    if arch in ("jumprelu",) and "threshold" not in tensors:
        missing.append("threshold")
    if arch == "batchtopk" and "topk_threshold" not in tensors:
        missing.append("topk_threshold")
    if missing:
        raise ValueError(f"{field}: {WEIGHTS} in '{folder}' lacks {missing} for architecture {arch!r}")
    d, n = cfg["d_in"], cfg["d_sae"]
    if tuple(tensors["W_enc"].shape) != (d, n) or tuple(tensors["W_dec"].shape) != (n, d):
        raise ValueError(f"{field}: W_enc {tuple(tensors['W_enc'].shape)} / W_dec {tuple(tensors['W_dec'].shape)} in "
                         f"'{folder}' do not match d_in={d}, d_sae={n} of its cfg.json")
    variant = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}[arch]
    model = make_sae(SAEConfig(variant=variant, d_in=d, n_latents=n,
                               **({"k": int(cfg.get("k", 100))} if variant in ("topk", "batchtopk") else {})))
    with torch.no_grad():
        model.W_enc.copy_(tensors["W_enc"].float())
        model.b_enc.copy_(tensors["b_enc"].float())
        model.W_dec.copy_(tensors["W_dec"].float())
        model.b_dec.copy_(tensors["b_dec"].float())
        if variant == "jumprelu":       # SAELens: relu(pre) * [pre > t]; ours: pre * [pre > t], t > 0
            model.log_threshold.copy_(tensors["threshold"].float().clamp_min(1e-30).log())
        if variant == "batchtopk":
            model.threshold.fill_(max(float(tensors["topk_threshold"]), 0.0))
        if (folder_sparsity := Path(folder) / SPARSITY).is_file():
            freq = 10 ** load_file(str(folder_sparsity))["sparsity"].double()
            model.fire_count.copy_((freq * 1e6).round().long())
            model.rows_seen.fill_(1_000_000)
    return model.eval()


def as_fit_output(model: SparseAutoencoder) -> dict:
    """The outputs a training node gives (``fit.fit``), so evaluation and reports take the SAE unchanged."""
    return {"sae": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            "sae_config": model.cfg.model_dump(mode="json")}


def given_sae(cfg: SaeFolder) -> dict:
    """Graph node: an SAE folder from disk, in the form the training node stores."""
    model = load_folder(cfg.path)
    return {**as_fit_output(model), "metrics": {"d_in": model.cfg.d_in, "n_latents": model.cfg.n_latents}}


class _Folder:
    """A folder the store saves by calling ``save_pretrained(path)`` (stored, and logged to MLflow, as a
    model folder)."""

    def __init__(self, write):
        self._write = write

    def save_pretrained(self, path: str) -> None:
        self._write(path)


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    site: str = Field("", description="the project's site name (set by the workflow)")
    model_name: str = Field("", description="the model's name or path, for cfg.json metadata")


def export(cfg: ExportConfig, sae: dict) -> dict:
    """Graph node: a trained SAE (a fit node's outputs) as a SAELens folder (own layout for archetypal
    variants), beside the project's files."""
    from interpflow.tasks.sites import UnknownSite, canonical_name, tl_alias

    from .fit import load_sae

    model = load_sae(sae)
    try:
        site = canonical_name(cfg.site)
    except UnknownSite:
        site = cfg.site
    hook = tl_alias(site) or site
    head = int(site.rsplit(".", 1)[1]) if ".attn.head." in site else None
    layout = "saelens" if model.cfg.variant in SAELENS_ARCHITECTURE else "own"
    return {"saelens": _Folder(lambda path: save_folder(model, path, hook_name=hook, site=site,
                                                        model_name=cfg.model_name, head=head)),
            "metrics": {"saelens_layout": float(layout == "saelens")}}


def folder_d_in(path: str, field: str = "sae.path") -> int:
    """d_in of a folder's cfg.json (checked), for width checks before compute."""
    return int(read_cfg(path, field)["d_in"])
