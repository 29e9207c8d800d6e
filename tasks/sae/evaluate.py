"""SAE evaluation on held-out examples, the same table for every variant.

Per shard of held-out examples (run on a model actor, which holds the language model), each batch is
run three times through the model: clean (the site's activations are captured), with the SAE spliced
in at the site (the site's tensor replaced by the SAE's reconstruction), and with the site zeroed.
Only sums are kept per shard, so the report is exact however the examples were sharded:

- reconstruction: rows, sum of squared error, sum and sum of squares of x (for FVU), active codes,
  per-latent firing counts;
- cross-entropy: next-token NLL sums clean / spliced / zero-ablated over the same tokens;
  CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean) (1 = as good as clean, 0 = no
  better than deleting the site);
- ground truth on the generated corpus: per-latent firing on the planted marker token (does some
  latent detect it?) and per-class sums of x (do atoms align with the class-mean directions?
  ``plausibility``, as in the Archetypal SAE paper).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch
from pydantic import BaseModel, ConfigDict, Field

from .fit import heldout_ids, load_sae


class SAEEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    site: str = Field("blocks.1.resid_post", description="where the SAE is spliced in")
    holdout: float = Field(0.1, gt=0, lt=1, description="fraction of example ids held out (as in training)")
    max_examples: int = Field(400, ge=1, description="held-out examples evaluated")
    batch_size: int = Field(16, ge=1)
    max_length: int | None = Field(None, ge=2, description="token limit; default the model's maximum")
    text_column: str = "text"
    id_column: str = "id"
    label_column: str | None = Field("topic", description="class labels for plausibility; None to skip")
    concept_token: str | None = Field("zorp", description="a planted token some latent should detect; None to skip")
    dense_threshold: float = Field(0.1, gt=0, le=1, description="latents firing on more rows are dense")


def eval_ids(cfg: SAEEvalConfig, data, **_) -> list:
    """The first `max_examples` held-out example ids, in dataset order."""
    ids = heldout_ids(data[cfg.id_column], cfg.holdout)[:cfg.max_examples]
    if not ids:
        raise ValueError(f"no example is held out for evaluation (holdout={cfg.holdout} of "
                         f"{data.num_rows} examples); raise sae.holdout")
    return ids


def _token_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL over real (non-padding) targets."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return (nll * mask[:, 1:]).sum()


def _marker_ids(tokenizer, token: str) -> set[int]:
    ids = set()
    for text in (token, " " + token):
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(pieces) == 1:
            ids.add(pieces[0])
    if not ids:
        raise ValueError(f"concept_token {token!r} is not one token for this tokenizer; set it to None")
    return ids


@torch.no_grad()
def evaluate_shard(cfg: SAEEvalConfig, shard, model, sae: dict, data) -> dict:
    """Sums over one shard of held-out examples; `model` is a LoadedModel (the actor's)."""
    from interpflow.tasks.sites import capture, intervene

    lm = model.model
    sae_model = load_sae(sae, model.device)
    site = model.sites.resolve(cfg.site)
    n_lat, d = sae_model.cfg.n_latents, sae_model.cfg.d_in
    has_head = getattr(lm, "get_output_embeddings", lambda: None)() is not None
    position = {v: i for i, v in enumerate(data[cfg.id_column])}
    subset = data.select([position[i] for i in shard.ids])
    texts = subset[cfg.text_column]
    labels = subset[cfg.label_column] if cfg.label_column else None
    markers = _marker_ids(model.tokenizer, cfg.concept_token) if cfg.concept_token else set()
    limit = min(cfg.max_length or model.max_length, model.max_length)

    acc = {"rows": 0, "sse": 0.0, "sum_sq": 0.0, "active": 0, "ce_tokens": 0,
           "nll_clean": 0.0, "nll_sae": 0.0, "nll_zero": 0.0, "marker_rows": 0}
    sum_x = torch.zeros(d, dtype=torch.float64)
    firing = torch.zeros(n_lat, dtype=torch.int64)
    marker_firing = torch.zeros(n_lat, dtype=torch.int64)
    class_sums: dict[Any, list] = {}

    def reconstruct(h: torch.Tensor) -> torch.Tensor:
        return sae_model(h.reshape(-1, d).float())[0].reshape(h.shape)

    for start in range(0, len(texts), cfg.batch_size):
        enc = model.tokenizer(texts[start:start + cfg.batch_size], padding=True, truncation=True,
                              max_length=limit, return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        mask = enc["attention_mask"].float()
        if has_head:
            seen = {}
            with intervene(lm, site, lambda h: seen.setdefault("x", h), n_heads=model.sites.n_heads):
                clean = lm(**enc).logits
            h = seen["x"]
            with intervene(lm, site, reconstruct, n_heads=model.sites.n_heads):
                spliced = lm(**enc).logits
            with intervene(lm, site, torch.zeros_like, n_heads=model.sites.n_heads):
                zeroed = lm(**enc).logits
            acc["nll_clean"] += float(_token_nll(clean, enc["input_ids"], mask))
            acc["nll_sae"] += float(_token_nll(spliced, enc["input_ids"], mask))
            acc["nll_zero"] += float(_token_nll(zeroed, enc["input_ids"], mask))
            acc["ce_tokens"] += int(mask[:, 1:].sum())
        else:
            h = capture(lm, [site], n_heads=model.sites.n_heads, **enc)[site.name]
        keep = enc["attention_mask"].bool()
        x = h[keep].float()
        x_hat, codes, _ = sae_model(x)
        fired = codes > 0
        acc["rows"] += x.shape[0]
        acc["sse"] += float((x_hat - x).double().pow(2).sum())
        acc["sum_sq"] += float(x.double().pow(2).sum())
        acc["active"] += int(fired.sum())
        sum_x += x.double().sum(0).cpu()
        firing += fired.sum(0).cpu()
        if markers:
            is_marker = torch.isin(enc["input_ids"][keep], torch.tensor(sorted(markers), device=x.device))
            acc["marker_rows"] += int(is_marker.sum())
            marker_firing += fired[is_marker].sum(0).cpu()
        if labels is not None:
            row_labels = np.repeat(np.asarray(labels[start:start + cfg.batch_size]), keep.sum(1).cpu().numpy())
            xs = x.double().cpu().numpy()
            for label in np.unique(row_labels):
                chosen = row_labels == label
                entry = class_sums.setdefault(label.item(), [0, np.zeros(d)])
                entry[0] += int(chosen.sum())
                entry[1] += xs[chosen].sum(0)

    stats = pa.table({**{k: [v] for k, v in acc.items()},
                      "sum_x": [sum_x.tolist()], "firing": [firing.tolist()], "marker_firing": [marker_firing.tolist()]})
    classes = pa.table({"label": [str(k) for k in class_sums], "count": [v[0] for v in class_sums.values()],
                        "sum_x": [v[1].tolist() for v in class_sums.values()]},
                       schema=pa.schema([("label", pa.string()), ("count", pa.int64()), ("sum_x", pa.list_(pa.float64()))]))
    return {"stats": stats, "classes": classes, "metrics": {"tokens": acc["rows"], "examples": len(texts)}}


def _summed(stats: pads.Dataset) -> dict[str, Any]:
    table = stats.to_table()
    out: dict[str, Any] = {}
    for name in table.column_names:
        column = table.column(name).to_pylist()
        out[name] = np.sum(np.asarray(column, dtype=np.float64), axis=0)
    return out


def best_detector(marker_firing: np.ndarray, firing: np.ndarray, marker_rows: float) -> dict[str, float]:
    """The latent whose firing best detects the marker token (F1), and its precision and recall."""
    if marker_rows <= 0:
        return {"marker_f1": math.nan, "marker_precision": math.nan, "marker_recall": math.nan, "marker_latent": -1}
    precision = marker_firing / np.maximum(firing, 1)
    recall = marker_firing / marker_rows
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    return {"marker_f1": float(f1[best]), "marker_precision": float(precision[best]),
            "marker_recall": float(recall[best]), "marker_latent": best}


def plausibility(dictionary: torch.Tensor, classes: pads.Dataset, overall_mean: np.ndarray) -> dict[str, float]:
    """Mean over classes of the best cosine between an atom and the class-mean direction
    (class mean minus the overall mean); with a same-size random dictionary as the chance level."""
    table = classes.to_table()
    if table.num_rows < 2:
        return {"plausibility": math.nan, "plausibility_chance": math.nan}
    sums: dict[str, list] = {}
    for label, count, sum_x in zip(*(table.column(c).to_pylist() for c in ("label", "count", "sum_x"))):
        entry = sums.setdefault(label, [0, 0.0])
        entry[0] += count
        entry[1] = entry[1] + np.asarray(sum_x)
    directions = np.stack([s / c - overall_mean for c, s in sums.values()])
    directions /= np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)

    def best_cos(atoms: np.ndarray) -> float:
        atoms = atoms / np.maximum(np.linalg.norm(atoms, axis=1, keepdims=True), 1e-12)
        return float((directions @ atoms.T).max(axis=1).mean())

    atoms = dictionary.detach().double().cpu().numpy()
    chance = np.random.default_rng(0).standard_normal(atoms.shape)
    return {"plausibility": best_cos(atoms), "plausibility_chance": best_cos(chance)}


class SAEReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dense_threshold: float = Field(0.1, gt=0, le=1)
    label: str = Field("", description="names the SAE in tables and plots (e.g. topk-k8)")


def report(cfg: SAEReportConfig, stats: pads.Dataset, classes: pads.Dataset, sae: dict) -> dict:
    """The evaluation table of one SAE (held-out tokens) and its latent density histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = _summed(stats)
    rows = float(s["rows"])
    mean = s["sum_x"] / max(rows, 1)
    total_var = float(s["sum_sq"] - rows * (mean @ mean))
    d = len(mean)
    ce = {}
    if s["ce_tokens"] > 0:
        t = float(s["ce_tokens"])
        clean, spliced, zero = s["nll_clean"] / t, s["nll_sae"] / t, s["nll_zero"] / t
        ce = {"ce_clean": clean, "ce_sae": spliced, "ce_zero": zero,
              "ce_loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else math.nan}
    freq = s["firing"] / max(rows, 1)
    model = load_sae(sae)
    metrics = {
        "mse": float(s["sse"]) / max(rows * d, 1),
        "fvu": float(s["sse"]) / total_var if total_var > 0 else math.nan,
        "l0": float(s["active"]) / max(rows, 1),
        "dead_frac": float((freq == 0).mean()),
        "dense_frac": float((freq > cfg.dense_threshold).mean()),
        "eval_tokens": rows,
        **ce,
        **best_detector(s["marker_firing"], s["firing"], float(s["marker_rows"])),
        **plausibility(model.dictionary(), classes, mean),
    }
    fig, ax = plt.subplots(figsize=(5, 3))
    live = freq[freq > 0]
    ax.hist(np.log10(live), bins=40) if live.size else None
    ax.set_xlabel("log10 firing frequency (held-out tokens)")
    ax.set_ylabel("latents")
    ax.set_title(f"latent density {cfg.label} ({int((freq == 0).sum())} dead)")
    fig.tight_layout()
    summary = {"label": cfg.label, "variant": model.cfg.variant, "k": model.cfg.k,
               "n_latents": model.cfg.n_latents, **metrics}
    return {"summary": summary, "latent_density": fig, "metrics": metrics}


class FrontierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_ce_loss_recovered: float = Field(0.5, description="ground truth: every SAE recovers at least this")
    min_marker_f1: float = Field(0.8, description="ground truth: some latent detects the planted token")


def frontier(cfg: FrontierConfig, **summaries: dict) -> dict:
    """All SAEs of a sweep in one table, the L0-FVU frontier plot, and the ground-truth checks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [summaries[name] for name in sorted(summaries)]
    table = pa.Table.from_pylist(rows)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for variant in sorted({r["variant"] for r in rows}):
        pts = sorted((r["l0"], r["fvu"], r["label"]) for r in rows if r["variant"] == variant)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("FVU (held-out)")
    ax.set_title("L0-FVU frontier")
    ax.legend(fontsize=7)
    fig.tight_layout()
    ce_ok = all(r.get("ce_loss_recovered", math.nan) >= cfg.min_ce_loss_recovered for r in rows)
    marker = [r["marker_f1"] for r in rows if not math.isnan(r["marker_f1"])]
    marker_ok = not marker or max(marker) >= cfg.min_marker_f1
    return {"table": table, "frontier": fig,
            "metrics": {"ground_truth_ok": float(ce_ok and marker_ok), "ce_ok": float(ce_ok),
                        "marker_ok": float(marker_ok), "saes": len(rows),
                        "best_marker_f1": max(marker) if marker else math.nan}}
