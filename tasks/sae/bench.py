"""Dictionary-quality benchmarks (after the Archetypal SAE paper): identifiability on synthetic data with
a known dictionary, stability across seeds and data halves, plausibility against known class
directions, and a Universal SAE across two models. Each run is a small graph node; the tables at the
end compare variants and state the ground-truth checks.

Stability is reported four ways, because a single number misleads:
``stability`` (mean Hungarian-matched cosine between the dictionaries of different seeds, all latents),
``stability_live`` (only latents that fire in both: dead latents keep their random start and drag a
variant down), ``stability_halves`` (seed 0 on one half of the examples vs seed 1 on the other) and
``stability_init`` (the same figure before training: how much of it the initialisation already gives;
archetypal atoms start on k-means centroids of the data, which differ little between seeds).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .arrays import absolute, load_rows
from .fit import heldout_mask, is_heldout
from .metrics import matched_cosine, pairwise_stability, recovery_report
from .synthetic import SyntheticConfig, synthetic_activations
from .train import SAETrainConfig, SAETrainer, train_sae
from .universal import UniversalSAEConfig, UniversalTrainConfig, co_firing, cross_r2, train_universal

from interpflow.tasks.types import Seed


def _rows(activations, half: Literal["all", "a", "b"] = "all") -> tuple[torch.Tensor, np.ndarray]:
    """All stored rows (or one half of the examples, split by a hash of the id) and their example ids."""
    from interpflow.tasks.activations import vectors_of

    table = activations.to_table() if hasattr(activations, "to_table") else activations
    ids = table.column("id").to_numpy()
    if half != "all":
        in_a = np.array([is_heldout(i, 0.5) for i in ids.tolist()])
        keep = in_a if half == "a" else ~in_a
        table, ids = table.filter(pa.array(keep)), ids[keep]
    return vectors_of(table).float(), ids


# ------------------------------------------------------------------------------------- identifiability

class IdentifiabilityData(SyntheticConfig):
    """The generated rows (the fields of ``SyntheticConfig``), or a researcher's own ``.npz``."""

    path: str | None = Field(None, description="a .npz of your own with arrays X (rows, d) and the true "
                             "atoms (n_atoms, d); set, it replaces the generated data (d, n_atoms, k, n, "
                             "coef_*, noise_std and seed then describe nothing and are not used)")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return absolute(value)


def identifiability_data(cfg: IdentifiabilityData) -> dict:
    """A graph node: the rows and their true dictionary, generated or read from ``cfg.path``."""
    if cfg.path is None:
        return synthetic_activations(cfg)
    loaded = load_rows(cfg.path, with_atoms=True)
    return {"activations": loaded["activations"], "dictionary": loaded["dictionary"]}


class IdentifyRun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: SAETrainConfig
    holdout: float = Field(0.1, ge=0, lt=1, description="fraction of examples (by a hash of the id) kept out of "
                                                        "training; fvu, mse and l0 are measured on them")


def identify(cfg: IdentifyRun, synthetic: dict) -> dict:
    """Train one variant with one seed on the training rows; how well it recovers the true dictionary,
    and its reconstruction on held-out rows (``fvu``; ``train_fvu`` on the rows it was trained on)."""
    x, ids = _rows(synthetic["activations"])
    held = heldout_mask(ids, cfg.holdout) if cfg.holdout > 0 else np.zeros(len(ids), dtype=bool)
    if held.all() or (cfg.holdout > 0 and not held.any()):
        raise ValueError(f"holdout={cfg.holdout} leaves {'no training' if held.all() else 'no held-out'} rows "
                         f"of {len(ids)}; change identifiability.holdout or bring more rows")
    train_x = x[torch.from_numpy(~held)]
    test_x = x[torch.from_numpy(held)] if held.any() else train_x
    model, _ = train_sae(cfg.train, train_x)
    report = recovery_report(model, test_x, synthetic["dictionary"])
    report["train_fvu"] = model.metrics(train_x)["fvu"]
    report["heldout_rows"] = int(held.sum())
    summary = {"variant": cfg.train.sae.variant, "seed": cfg.train.seed, **report}
    return {"summary": summary, "metrics": report}


class IdentifiabilityCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_topk_matched_cosine: float = Field(0.9, description="TopK must recover the true dictionary this well "
                                                            "with every seed")


def identifiability_table(cfg: IdentifiabilityCheck, **summaries: dict) -> dict:
    """One row per variant (means over its seeds, and the worst seed's matched cosine) and one per run."""
    runs = [summaries[k] for k in sorted(summaries)]
    rows = []
    for variant in sorted({r["variant"] for r in runs}):
        mine = [r for r in runs if r["variant"] == variant]
        cos = [r["matched_cosine"] for r in mine]
        rows.append({"variant": variant, "seeds": len(mine), "matched_cosine": float(np.mean(cos)),
                     "matched_cosine_std": float(np.std(cos)), "worst_seed_matched_cosine": float(min(cos)),
                     **{m: float(np.mean([r[m] for r in mine]))
                        for m in ("min_matched_cosine", "recovered_frac", "fvu", "train_fvu", "mse", "l0",
                                  "dead_frac", "dense_frac")}})
    topk = next((r["worst_seed_matched_cosine"] for r in rows if r["variant"] == "topk"), math.nan)
    return {"table": pa.Table.from_pylist(rows), "runs": pa.Table.from_pylist(runs),
            "metrics": {"topk_matched_cosine": topk, "ground_truth_ok": float(topk >= cfg.min_topk_matched_cosine),
                        **{f"{r['variant']}.matched_cosine": r["matched_cosine"] for r in rows},
                        **{f"{r['variant']}.heldout_fvu": r["fvu"] for r in rows}}}


# ------------------------------------------------------------------------------------------ stability

class StabilityRun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: SAETrainConfig
    half: Literal["all", "a", "b"] = Field("all", description="train on all examples or one half of them")
    label_column: str | None = Field("topic", description="class labels for plausibility (None to skip)")
    id_column: str = "id"


class StabilityData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., description="a .npz of your own with X (rows, d) and optionally ids (rows,: the "
                                       "example of each row, for the halves) and labels (rows,: for plausibility)")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return absolute(value)


def stability_data(cfg: StabilityData) -> dict:
    """A graph node: a researcher's rows as the stability runs take them (activations, and data with
    id and, when given, label)."""
    return load_rows(cfg.path)


def _column(data, name: str) -> list:
    """A column as a list, from a datasets.Dataset, a pyarrow table or a stored (pyarrow) dataset."""
    if hasattr(data, "to_table"):
        return data.to_table(columns=[name]).column(name).to_pylist()
    if isinstance(data, pa.Table):
        return data.column(name).to_pylist()
    return list(data[name])


def class_directions(x: torch.Tensor, ids: np.ndarray, data, label_column: str, id_column: str) -> np.ndarray:
    """Unit class-mean directions (class mean minus overall mean) of rows x labelled through their example."""
    labels_of = dict(zip(_column(data, id_column), _column(data, label_column)))
    labels = np.array([labels_of[i] for i in ids.tolist()])
    xs = x.double().numpy()
    overall = xs.mean(0)
    dirs = np.stack([xs[labels == c].mean(0) - overall for c in np.unique(labels)])
    return dirs / np.maximum(np.linalg.norm(dirs, axis=1, keepdims=True), 1e-12)


def best_cosines(atoms: torch.Tensor, directions: np.ndarray) -> float:
    """Mean over directions of the best cosine with any atom (plausibility)."""
    a = atoms.detach().double().numpy()
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    return float((directions @ a.T).max(axis=1).mean())


def stability_run(cfg: StabilityRun, activations, data) -> dict:
    """One SAE for the stability table: its dictionary before and after training, and which latents live."""
    x, ids = _rows(activations, cfg.half)
    # initialise as train_sae would (same rows), keep the starting dictionary, then train that model on
    init = SAETrainer(cfg.train)
    init.initialise(x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(cfg.train.seed))
                      [:cfg.train.init_rows]])
    with torch.no_grad():
        init_dictionary = init.model.dictionary().detach().clone()
    model, _ = train_sae(cfg.train, x, model=init.model, fresh=False)
    held = model.metrics(x)
    with torch.no_grad():
        codes_fire = torch.zeros(cfg.train.sae.n_latents, dtype=torch.bool)
        for start in range(0, x.shape[0], 8192):
            codes_fire |= (model.encode(x[start:start + 8192]) > 0).any(0)
    metrics = {**held}
    if cfg.label_column:
        dirs = class_directions(x, ids, data, cfg.label_column, cfg.id_column)
        metrics["plausibility"] = best_cosines(model.dictionary(), dirs)
        metrics["plausibility_chance"] = best_cosines(torch.randn(model.dictionary().shape,
                                                                  generator=torch.Generator().manual_seed(0)), dirs)
    return {"dictionary": model.dictionary().detach(), "init_dictionary": init_dictionary,
            "live": codes_fire.to(torch.uint8), "summary": metrics, "metrics": metrics}


class StabilityCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: str = Field("topk", description="the variant RA-SAE is compared with")
    candidate: str = Field("relaxed_archetypal", description="the variant expected to be more stable")
    max_fvu_gap: float = Field(0.05, ge=0, description="'comparable reconstruction': candidate FVU at most this "
                                                      "much above the reference's")


def _live_stability(dicts: list[torch.Tensor], lives: list[torch.Tensor]) -> float:
    values = []
    for i in range(len(dicts)):
        for j in range(i + 1, len(dicts)):
            a, b = dicts[i][lives[i].bool()], dicts[j][lives[j].bool()]
            if len(a) and len(b):
                small, large = (a, b) if len(a) <= len(b) else (b, a)
                values.append(matched_cosine(small, large)[0])
    return float(np.mean(values)) if values else math.nan


def stability_table(cfg: StabilityCheck, **runs: dict) -> dict:
    """Runs are named `<variant>.seed<s>` (all data) and `<variant>.half-a` / `<variant>.half-b`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({name.split(".")[0] for name in runs})
    rows = []
    for variant in variants:
        seeds = [runs[n] for n in sorted(runs) if n.startswith(variant + ".seed")]
        halves = [runs[n] for n in (f"{variant}.half-a", f"{variant}.half-b") if n in runs]
        summaries = [r["summary"] for r in seeds]
        row = {"variant": variant, "seeds": len(seeds),
               "stability": pairwise_stability([r["dictionary"] for r in seeds])[0],
               "stability_live": _live_stability([r["dictionary"] for r in seeds], [r["live"] for r in seeds]),
               "stability_init": pairwise_stability([r["init_dictionary"] for r in seeds])[0],
               "stability_halves": (matched_cosine(halves[0]["dictionary"], halves[1]["dictionary"])[0]
                                    if len(halves) == 2 else math.nan),
               "fvu": float(np.mean([x["fvu"] for x in summaries])),
               "l0": float(np.mean([x["l0"] for x in summaries])),
               "live_frac": float(np.mean([r["live"].float().mean() for r in seeds])),
               "plausibility": float(np.mean([x.get("plausibility", math.nan) for x in summaries])),
               "plausibility_chance": float(np.mean([x.get("plausibility_chance", math.nan) for x in summaries]))}
        rows.append(row)
    by = {r["variant"]: r for r in rows}
    ok = math.nan
    if cfg.reference in by and cfg.candidate in by:
        ref, cand = by[cfg.reference], by[cfg.candidate]
        ok = float(cand["stability"] > ref["stability"] and cand["fvu"] <= ref["fvu"] + cfg.max_fvu_gap)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    measures = ["stability", "stability_live", "stability_halves", "stability_init"]
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        ax.bar(np.arange(len(measures)) + i * width, [row[m] for m in measures], width,
               label=f"{row['variant']} (FVU {row['fvu']:.3f})")
    ax.set_xticks(np.arange(len(measures)) + width * (len(rows) - 1) / 2, measures, fontsize=8)
    ax.set_ylabel("matched cosine")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("dictionary stability across seeds")
    fig.tight_layout()
    return {"table": pa.Table.from_pylist(rows), "stability": fig,
            "metrics": {"ground_truth_ok": ok, **{f"{r['variant']}.{m}": r[m] for r in rows
                                                  for m in ("stability", "stability_live", "fvu")}}}


# ------------------------------------------------------------------------------------------ universal

class UniversalStudy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_latents: int = Field(128, ge=2)
    k: int = Field(8, ge=1)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_self_ratio: float = Field(0.8, description="self R^2 must be at least this fraction of a single-model SAE's")
    names: tuple[str, str] = ("a", "b")
    seed: Seed = 0


def paired_rows(a, b) -> list[torch.Tensor]:
    """Rows of two models' activations joined on (example id, token position)."""
    ta = a.to_table() if hasattr(a, "to_table") else a
    tb = b.to_table() if hasattr(b, "to_table") else b
    ta = ta.append_column("row_a", pa.array(np.arange(ta.num_rows)))
    tb = tb.append_column("row_b", pa.array(np.arange(tb.num_rows)))
    joined = ta.select(["id", "position", "row_a"]).join(tb.select(["id", "position", "row_b"]), ["id", "position"])
    if joined.num_rows == 0:
        raise ValueError("the two models' activations share no (id, position): they must come from the same "
                         "examples with the same tokenizer")
    joined = joined.sort_by([("row_a", "ascending")])
    from interpflow.tasks.activations import vectors_of

    xa = vectors_of(ta.take(joined.column("row_a"))).float()
    xb = vectors_of(tb.take(joined.column("row_b"))).float()
    return [xa, xb]


def universal_study(cfg: UniversalStudy, a, b) -> dict:
    """A Universal SAE on two models' paired activations, against a single-model TopK SAE per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .base import SAEConfig

    xs = paired_rows(a, b)
    ucfg = UniversalTrainConfig(sae=UniversalSAEConfig(d_ins=[x.shape[1] for x in xs], model_names=list(cfg.names),
                                                       n_latents=cfg.n_latents, k=cfg.k, seed=cfg.seed),
                                steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    model, _ = train_universal(ucfg, xs)
    r2 = cross_r2(model, xs)
    single = []
    for x in xs:
        scfg = SAETrainConfig(sae=SAEConfig(variant="topk", d_in=x.shape[1], n_latents=cfg.n_latents, k=cfg.k,
                                            seed=cfg.seed), steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                              seed=cfg.seed)
        sae, _ = train_sae(scfg, x)
        single.append(1 - sae.metrics(x)["fvu"])
    firing = co_firing(model, xs)
    names = list(cfg.names)
    table = pa.table({"source": names, **{f"r2_to_{n}": r2[:, j].tolist() for j, n in enumerate(names)},
                      "single_model_r2": single})
    ratios = [float(r2[m, m] / single[m]) for m in range(len(xs))]
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    im = ax.imshow(r2, vmin=0, vmax=1, cmap="viridis")
    for (i, j), v in np.ndenumerate(r2):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    ax.set_title("Universal SAE R^2")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    metrics = {**{f"r2.{names[i]}_to_{names[j]}": float(v) for (i, j), v in np.ndenumerate(r2)},
               **{f"self_ratio.{n}": r for n, r in zip(names, ratios)},
               "shared_frac": firing["shared_frac"], "shared_of_alive": firing["shared_of_alive"],
               "paired_rows": xs[0].shape[0],
               "ground_truth_ok": float(min(ratios) >= cfg.min_self_ratio)}
    from .saelens import _Folder, save_universal_folder

    return {"table": table, "cross_r2": fig, "universal_sae": _Folder(lambda path: save_universal_folder(model, path)),
            "metrics": metrics}
