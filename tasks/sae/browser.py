"""A latent browser: one self-contained HTML page per SAE (no server, no network, no CDN).

The page holds a sortable table of latents (density and mean activation on held-out tokens, the
planted marker token's F1 where there is ground truth) and, for the latent clicked, its top-activating
contexts with every token shaded by that latent's activation, its activation histogram, and its
decoder direction's top and bottom logit effects through the unembedding (``W_U @ d_i``; the final
norm is left out, as is usual for a direct logit read-out).

Everything is computed from stored held-out activations (the examples training never saw), the
tokenizer and the unembedding of the model, so it needs no model actor.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .base import SparseAutoencoder


class BrowserConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_examples: int = Field(200, ge=1, description="held-out examples read")
    top_contexts: int = Field(6, ge=1, description="top-activating contexts shown per latent")
    window: int = Field(8, ge=0, description="tokens shown either side of the peak token")
    top_logits: int = Field(8, ge=1, description="tokens listed for the top and the bottom logit effects")
    bins: int = Field(20, ge=2, description="bins of the activation histogram")
    holdout: float = Field(0.1, gt=0, lt=1, description="as in training (set by the workflow)")
    id_column: str = "id"
    text_column: str = "text"
    concept_token: str | None = Field("zorp", description="a planted token, for the marker F1 column; None to skip")
    label: str = ""


def latent_table(model: SparseAutoencoder, x: torch.Tensor, token_ids: np.ndarray, rows: list[tuple],
                 tokens_of: dict, cfg: BrowserConfig, unembed: torch.Tensor | None = None,
                 vocab: list[str] | None = None, markers: set[int] | None = None) -> dict:
    """The page's data. x: held-out rows (n, d); token_ids: each row's token id; rows: each row's
    (example id, position); tokens_of: example id -> its token strings."""
    with torch.no_grad():
        codes = torch.cat([model.encode(x[i:i + 4096]) for i in range(0, len(x), 4096)]).double().numpy()
    fired = codes > 0
    n_rows = max(len(x), 1)
    is_marker = np.isin(token_ids, sorted(markers)) if markers else np.zeros(len(x), bool)
    directions = None
    if unembed is not None:
        with torch.no_grad():
            atoms = model.dictionary().detach().float()
            directions = (atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ unembed.float().T
    rows_of: dict = {}
    for j, (e, _) in enumerate(rows):
        rows_of.setdefault(e, []).append(j)
    latents = []
    for i in range(codes.shape[1]):
        acts = codes[:, i]
        on = fired[:, i]
        entry = {"latent": i, "density": float(on.sum() / n_rows),
                 "mean_act": float(acts[on].mean()) if on.any() else 0.0, "max_act": float(acts.max(initial=0.0)),
                 "marker_f1": None}
        if markers and is_marker.any():
            tp = float((on & is_marker).sum())
            precision, recall = tp / max(on.sum(), 1), tp / is_marker.sum()
            entry["marker_f1"] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        if on.any():
            counts, edges = np.histogram(acts[on], bins=cfg.bins)
            entry["hist"] = {"counts": counts.tolist(), "lo": float(edges[0]), "hi": float(edges[-1])}
            contexts, seen = [], set()
            for r in np.argsort(-acts, kind="stable"):
                if acts[r] <= 0 or len(contexts) >= cfg.top_contexts:
                    break
                example, position = rows[r]
                if (example, position) in seen:
                    continue
                seen.add((example, position))
                act_at = {rows[j][1]: float(acts[j]) for j in rows_of[example]}
                tokens = tokens_of[example]
                lo, hi = max(0, position - cfg.window), min(len(tokens), position + cfg.window + 1)
                contexts.append({"example": str(example), "peak": position - lo,
                                 "tokens": [[tokens[p], round(act_at.get(p, 0.0), 4)] for p in range(lo, hi)]})
            entry["contexts"] = contexts
        if directions is not None and vocab is not None:
            effect = directions[i]
            top = torch.topk(effect, min(cfg.top_logits, len(effect)))
            bottom = torch.topk(-effect, min(cfg.top_logits, len(effect)))
            entry["logits_top"] = [[vocab[j], round(float(v), 4)] for v, j in zip(top.values, top.indices)]
            entry["logits_bottom"] = [[vocab[j], round(-float(v), 4)] for v, j in zip(bottom.values, bottom.indices)]
        latents.append(entry)
    return {"label": cfg.label, "rows": len(x), "marker": cfg.concept_token if markers else None, "latents": latents}


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>latents: __TITLE__</title>
<style>
body{font:14px system-ui,sans-serif;margin:0;display:flex;height:100vh}
#left{width:46%;overflow:auto;border-right:1px solid #ccc}#right{flex:1;overflow:auto;padding:0 16px}
table{border-collapse:collapse;width:100%}th,td{padding:3px 8px;text-align:right}
th{position:sticky;top:0;background:#eee;cursor:pointer}tr.latent:hover{background:#f3f3ff;cursor:pointer}
tr.selected{background:#dde}.ctx{font-family:monospace;margin:6px 0;line-height:1.8}
.tok{padding:1px 0;margin-right:2px;border-radius:2px;white-space:pre}.peak{outline:1px solid #c30}
.bar{display:inline-block;width:12px;background:#58a;margin-right:1px;vertical-align:bottom}
.logits{display:flex;gap:32px}ol{margin:4px 0;padding-left:20px;font-family:monospace}
</style></head><body>
<div id="left"><table id="latents"><thead><tr>
<th data-key="latent">latent</th><th data-key="density">density</th><th data-key="mean_act">mean act</th>
<th data-key="max_act">max act</th><th data-key="marker_f1">marker F1</th></tr></thead><tbody></tbody></table></div>
<div id="right"><h2 id="title">__TITLE__</h2><p id="hint">Click a latent. __ROWS__ held-out tokens.</p>
<div id="detail"></div></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const body = document.querySelector("#latents tbody");
let sortKey = "density", descending = true;
function fmt(v, digits) { return v === null || v === undefined ? "\\u2014" : Number(v).toFixed(digits); }
function esc(s) { return String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]); }
function renderTable() {
  const rows = DATA.latents.slice().sort((a, b) => {
    const x = a[sortKey] === null ? -1 : a[sortKey], y = b[sortKey] === null ? -1 : b[sortKey];
    return descending ? y - x : x - y;
  });
  body.innerHTML = rows.map(l => `<tr class="latent" data-latent="${l.latent}"><td>${l.latent}</td>` +
    `<td>${fmt(l.density, 4)}</td><td>${fmt(l.mean_act, 3)}</td><td>${fmt(l.max_act, 3)}</td>` +
    `<td>${fmt(l.marker_f1, 3)}</td></tr>`).join("");
}
function show(index) {
  const l = DATA.latents[index];
  document.querySelectorAll("tr.selected").forEach(r => r.classList.remove("selected"));
  const row = document.querySelector(`tr[data-latent="${index}"]`);
  if (row) row.classList.add("selected");
  let out = `<h3>latent ${l.latent}</h3><p>density ${fmt(l.density, 4)}, mean activation ${fmt(l.mean_act, 3)}` +
            (l.marker_f1 === null ? "" : `, F1 for '${esc(DATA.marker)}' ${fmt(l.marker_f1, 3)}`) + "</p>";
  if (l.hist) {
    const top = Math.max(...l.hist.counts, 1);
    out += `<h4>activation histogram (${fmt(l.hist.lo, 2)} .. ${fmt(l.hist.hi, 2)})</h4><div class="hist">` +
      l.hist.counts.map(c => `<span class="bar" title="${c}" style="height:${Math.round(80 * c / top) + 1}px"></span>`).join("") + "</div>";
  }
  out += "<h4>top-activating contexts</h4>";
  for (const [k, c] of (l.contexts || []).entries()) {
    const peak = Math.max(...c.tokens.map(t => t[1]), 1e-12);
    out += `<div class="ctx" data-rank="${k}">` + c.tokens.map(([tok, a], j) =>
      `<span class="tok${j === c.peak ? " peak" : ""}" data-act="${a}" style="background:rgba(255,110,0,${(a / peak).toFixed(3)})">${esc(tok)}</span>`).join("") + "</div>";
  }
  if (!l.contexts) out += "<p>never fires on the held-out tokens</p>";
  if (l.logits_top) {
    const list = xs => "<ol>" + xs.map(([t, v]) => `<li>${esc(t)} <small>${fmt(v, 3)}</small></li>`).join("") + "</ol>";
    out += `<h4>logit effects of the decoder direction</h4><div class="logits"><div>top${list(l.logits_top)}</div>` +
           `<div>bottom${list(l.logits_bottom)}</div></div>`;
  }
  document.getElementById("detail").innerHTML = out;
}
document.querySelectorAll("th").forEach(th => th.addEventListener("click", () => {
  const key = th.dataset.key;
  descending = key === sortKey ? !descending : true;
  sortKey = key;
  renderTable();
}));
body.addEventListener("click", e => { const tr = e.target.closest("tr.latent"); if (tr) show(Number(tr.dataset.latent)); });
renderTable();
</script></body></html>
"""


def render(data: dict) -> str:
    """The page: one HTML file, its data inline (``</`` escaped so no string can close the script)."""
    payload = json.dumps(data, allow_nan=False).replace("</", "<\\/")
    title = html.escape(f"SAE {data['label']}".strip())
    return (_PAGE.replace("__TITLE__", title).replace("__ROWS__", str(data["rows"]))
            .replace("__DATA__", payload))


class _Page:
    """A finished page: the engine stores it as ``<output>.html`` and logs it as an MLflow artifact (it takes
    any value with IPython's ``_repr_html_``, so a notebook shows it inline too)."""

    def __init__(self, text: str):
        self.text = text

    def _repr_html_(self) -> str:
        return self.text


def _marker_ids(tokenizer, token: str) -> set[int]:
    ids = set()
    for text in (token, " " + token):
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(pieces) == 1:
            ids.add(pieces[0])
    return ids


def browser(cfg: BrowserConfig, sae: dict, activations, data, model) -> dict:
    """Graph node: the latent browser page of one SAE (``browser.html``) from held-out activations,
    the tokenizer and the unembedding of ``model`` (a model folder or hub id)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import transformers

    from interpflow.tasks.activations import vectors_of

    from .fit import heldout_ids, load_sae

    sae_model = load_sae(sae)
    ids = heldout_ids(list(data[cfg.id_column]), cfg.holdout)[:cfg.max_examples]
    if not ids:
        raise ValueError(f"no example is held out (holdout={cfg.holdout}); the browser shows held-out tokens only")
    if not isinstance(activations, pads.Dataset):
        activations = pads.dataset(activations)
    table = activations.to_table(filter=pc.field("id").isin(ids))
    table = table.sort_by([("id", "ascending"), ("position", "ascending")])
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    unembed = vocab = None
    try:
        lm = transformers.AutoModelForCausalLM.from_pretrained(model)
        head = lm.get_output_embeddings()
        if head is not None:
            unembed = head.weight.detach()
            vocab = [tokenizer.decode([j]) for j in range(unembed.shape[0])]
    except (OSError, ValueError):   # no language-model head: no logit effects
        pass
    position_of = {v: i for i, v in enumerate(data[cfg.id_column])}
    texts = {i: data[position_of[i]][cfg.text_column] for i in ids}
    encoded = {i: tokenizer(texts[i])["input_ids"] for i in ids}
    tokens_of = {i: [tokenizer.decode([t]) for t in encoded[i]] for i in ids}
    example, position = table.column("id").to_pylist(), table.column("position").to_pylist()
    token_ids = np.array([encoded[e][p] if p < len(encoded[e]) else -1 for e, p in zip(example, position)])
    markers = _marker_ids(tokenizer, cfg.concept_token) if cfg.concept_token else None
    page = latent_table(sae_model, vectors_of(table).float(), token_ids, list(zip(example, position)), tokens_of, cfg,
                        unembed, vocab, markers)
    f1 = [entry["marker_f1"] for entry in page["latents"] if entry["marker_f1"] is not None]
    return {"browser": _Page(render(page)),
            "metrics": {"browser_rows": len(example), "browser_best_marker_f1": max(f1) if f1 else float("nan")}}
