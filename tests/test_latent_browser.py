"""The latent browser page (issue #30, point 3) opened in headless Chromium: sortable table, a latent's
top contexts shaded by activation, histogram, logit effects; one file, no network, no console error.
No Ray: the page is built from a tiny LM's held-out activations and an SAE trained here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _chromium_or_skip():
    """Chromium and Playwright, installed by .ci/run; the test skips only when neither can be had."""
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (.ci/run installs it: pip install playwright)")
    try:
        subprocess.run([CHROMIUM, "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"no Chromium at {CHROMIUM} (.ci/run installs it: apt-get install -y chromium chromium-driver)")


@pytest.fixture(scope="module")
def page_file(tmp_path_factory):
    from interpflow.tasks import text_corpus, tiny_lm
    from interpflow.tasks.activations import ExtractConfig, extract_shard, vectors_of
    from interpflow.tasks.models import ModelConfig, load_model
    from interpflow.tasks.sae import SAEConfig, SAETrainConfig, train_sae
    from interpflow.tasks.sae.browser import BrowserConfig, browser
    from interpflow.tasks.sae.fit import heldout_mask
    from interpflow.tasks.sae.saelens import as_fit_output
    from interpflow.workflows.engine.graph import Shard
    from interpflow.workflows.engine.store import _write_output

    root = tmp_path_factory.mktemp("browser")
    corpus = text_corpus.make_corpus(text_corpus.CorpusConfig(n_examples=300, concept_rate=0.5))
    tiny_lm.train_tiny_lm(tiny_lm.TinyLMConfig(n_layer=2, n_embd=32, n_head=4, steps=1), corpus).save_pretrained(
        root / "lm")
    loaded = load_model(str(root / "lm"), ModelConfig())
    acts = extract_shard(ExtractConfig(sites=["embed"], batch_size=64), Shard(0, 1, tuple(corpus["id"])), loaded,
                         corpus)["embed"]
    train = vectors_of(acts).float()[torch.from_numpy(~heldout_mask(acts.column("id").to_numpy(), 0.2))]
    sae, _ = train_sae(SAETrainConfig(sae=SAEConfig(variant="topk", d_in=32, n_latents=64, k=4), steps=400,
                                      batch_size=128, init_rows=1024, threads=1), train)
    out = browser(BrowserConfig(holdout=0.2, max_examples=60, label="topk-k4"), as_fit_output(sae), acts, corpus,
                  str(root / "lm"))
    (root / "page").mkdir()
    stored = _write_output("browser", out["browser"], root / "page")   # as the engine commits it
    assert stored.kind == "html" and out["metrics"]["browser_rows"] > 500
    return root / "page" / stored.path


def test_page_is_one_file_with_its_data_inline(page_file):
    text = page_file.read_text()
    assert [p.name for p in page_file.parent.iterdir()] == ["browser.html"]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)        # nothing fetched from a network
    data = json.loads(re.search(r'id="data">(.*?)</script>', text, re.S).group(1).replace("<\\/", "</"))
    latents = data["latents"]
    assert len(latents) == 64 and data["marker"] == "zorp"
    live = [entry for entry in latents if entry["density"] > 0]
    assert live and all(len(entry["logits_top"]) == 8 and entry["hist"]["counts"] for entry in live)


def test_page_opens_in_headless_chromium(page_file, tmp_path):
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    errors, requests = [], []
    with sync_playwright() as p:
        chrome = p.chromium.launch_persistent_context(     # a fresh profile directory (--user-data-dir)
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = chrome.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.as_uri())
            assert page.locator("tr.latent").count() == 64
            page.click("th[data-key=marker_f1]")                             # sort: best marker detector first
            f1 = [c for c in page.locator("tr.latent td:nth-child(5)").all_inner_texts()[:3]]
            assert float(f1[0]) >= float(f1[1]) >= float(f1[2]) and float(f1[0]) > 0.3
            page.locator("tr.latent").first.click()
            peak = page.locator(".ctx[data-rank='0'] .tok.peak")
            assert "zorp" in peak.inner_text()                               # the planted marker, highlighted
            shades = page.locator(".ctx[data-rank='0'] .tok").evaluate_all(
                "els => els.map(e => Number(e.dataset.act))")
            assert max(shades) == float(peak.get_attribute("data-act")) > 0
            assert page.locator(".hist .bar").count() == 20 and page.locator(".logits li").count() == 16
            page.screenshot(path=str(tmp_path / "browser.png"), full_page=True)
        finally:
            chrome.close()
    assert not errors, errors
    assert all(u.startswith("file://") for u in requests), requests
    assert (tmp_path / "browser.png").stat().st_size > 10_000
