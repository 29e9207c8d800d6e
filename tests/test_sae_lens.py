"""SAEs in the SAELens layout, both ways (issue #30, point 1), checked against the real `sae-lens`
package (a test extra; it installs beside the CPU torch pin without changing torch, transformers, ray,
mlflow or numpy). No Ray."""

from __future__ import annotations

import json

import pytest
import torch

from interpflow.tasks.sae import SAEConfig, SAETrainConfig, SyntheticConfig, make_synthetic, train_sae
from interpflow.tasks.sae.saelens import as_fit_output, export, ExportConfig, load_folder, read_cfg, save_folder

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is in the test extra: pip install -e '.[test]'")

VARIANTS = ["relu", "topk", "batchtopk", "jumprelu", "relaxed_archetypal"]


@pytest.fixture(scope="module")
def data():
    x, _, _ = make_synthetic(SyntheticConfig(d=16, n_atoms=24, k=2, n=2400, seed=2))
    return x[:2000] * 3 + 0.5, x[2000:] * 3 + 0.5            # raw units: scaled and offset (input_scale != 1)


@pytest.fixture(scope="module")
def trained(data):
    train, _ = data
    out = {}
    for variant in VARIANTS:
        k = {"k": 3} if variant in ("topk", "batchtopk", "relaxed_archetypal") else {}
        sae = SAEConfig(variant=variant, d_in=16, n_latents=32, n_candidates=32, l0_coeff=1e-3, **k)
        out[variant], _ = train_sae(SAETrainConfig(sae=sae, steps=60, batch_size=100, init_rows=500, threads=1), train)
    return out


@pytest.mark.parametrize("variant", ["relu", "topk", "batchtopk", "jumprelu"])
def test_saelens_loads_our_folder_and_reconstructs_the_same(variant, trained, data, tmp_path):
    _, held = data
    ours = trained[variant]
    assert abs(float(ours.input_scale) - 1) > 0.05                       # the scale fold is exercised
    save_folder(ours, tmp_path, hook_name="blocks.1.hook_resid_post", site="blocks.1.resid_post", model_name="tiny")
    assert {p.name for p in tmp_path.iterdir()} == {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert theirs.cfg.architecture() == {"relu": "standard", "batchtopk": "jumprelu"}.get(variant, variant)
    with torch.no_grad():
        x_hat = ours(held)[0]
        assert torch.allclose(theirs(held), x_hat, atol=1e-5, rtol=0)
        assert torch.equal(theirs.encode(held) > 0, ours.encode(held) > 0)
        back = load_folder(tmp_path)                                      # and home again
        assert torch.allclose(back(held)[0], x_hat, atol=1e-5, rtol=0)


def test_a_native_saelens_folder_loads_here(data, tmp_path):
    _, held = data
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    made = {"standard": StandardSAE(StandardSAEConfig(d_in=16, d_sae=40)),
            "topk": TopKSAE(TopKSAEConfig(d_in=16, d_sae=40, k=5)),
            "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=40))}
    with torch.no_grad():
        made["jumprelu"].threshold.uniform_(0.05, 0.3)
        for sae in made.values():
            sae.b_dec.normal_()
            sae.b_enc.normal_(0, 0.1)
    for arch, sae in made.items():
        folder = tmp_path / arch
        sae.save_model(folder)
        ours = load_folder(folder)
        with torch.no_grad():
            assert torch.allclose(ours(held)[0], sae(held), atol=1e-5, rtol=0), arch
        assert ours.cfg.n_latents == 40 and (ours.cfg.k == 5 if arch == "topk" else True)


def test_archetypal_writes_its_own_layout_with_a_cfg(trained, data, tmp_path):
    _, held = data
    ra = trained["relaxed_archetypal"]
    save_folder(ra, tmp_path, hook_name="blocks.1.hook_resid_post", site="blocks.1.resid_post")
    cfg = read_cfg(tmp_path)
    assert cfg["architecture"] == "interpflow.relaxed_archetypal" and cfg["interpflow_config"]["delta"] == ra.cfg.delta
    with torch.no_grad():
        assert torch.allclose(load_folder(tmp_path)(held)[0], ra(held)[0], atol=1e-6)


def test_export_node_and_given_folder_feed_evaluation(trained, data, tmp_path):
    out = export(ExportConfig(site="blocks.1.attn.head.2", model_name="tiny"), as_fit_output(trained["topk"]))
    out["saelens"].save_pretrained(str(tmp_path / "exported"))
    cfg = read_cfg(tmp_path / "exported")
    assert cfg["metadata"]["hook_name"] == "blocks.1.attn.hook_z.2" and cfg["metadata"]["hook_head_index"] == 2
    assert cfg["metadata"]["interpflow_site"] == "blocks.1.attn.head.2"


def test_bad_folders_are_named(tmp_path, trained):
    save_folder(trained["topk"], tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ValueError, match=r"sae.path: unknown architecture 'gated'.*readable: standard, topk, jumprelu"):
        load_folder(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(ValueError, match=r"normalize_activations='layer_norm'.*not supported"):
        load_folder(tmp_path)
    with pytest.raises(ValueError, match=r"no cfg.json in"):
        load_folder(tmp_path / "nowhere")


def test_a_saelens_folder_runs_through_the_evaluation_node(tmp_path):
    """`sae.path=FOLDER`: the folder's SAE, spliced in at the site (named by its TransformerLens hook), is
    evaluated by the same shard and report functions a trained SAE is."""
    import datasets
    import pyarrow.dataset as pads
    from sae_lens import TopKSAE, TopKSAEConfig

    from interpflow.tasks import text_corpus, tiny_lm
    from interpflow.tasks.models import LoadedModel
    from interpflow.tasks.sae import evaluate as sae_eval
    from interpflow.tasks.sae.saelens import SaeFolder, given_sae
    from interpflow.tasks.sites import SiteMap
    from interpflow.workflows.engine.graph import Shard

    corpus = text_corpus.make_corpus(text_corpus.CorpusConfig(n_examples=40))
    lm = tiny_lm.train_tiny_lm(tiny_lm.TinyLMConfig(n_layer=2, n_embd=32, n_head=4, steps=1), corpus)
    loaded = LoadedModel(lm.model.eval(), lm.tokenizer, "cpu", SiteMap(lm.model), "tiny")
    torch.manual_seed(1)
    TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=4)).save_model(tmp_path / "theirs")
    sae = given_sae(SaeFolder(path=str(tmp_path / "theirs")))
    data = datasets.Dataset.from_dict({"id": corpus["id"][:6], "text": corpus["text"][:6]})
    cfg = sae_eval.SAEEvalConfig(site="blocks.1.hook_resid_post", label_column=None, concept_token=None)
    shard = sae_eval.evaluate_shard(cfg, Shard(0, 1, tuple(data["id"])), loaded, sae, data)
    report = sae_eval.report(sae_eval.SAEReportConfig(label="given"), pads.dataset(shard["stats"]),
                             pads.dataset(shard["classes"]), sae)
    summary = report["summary"]
    assert summary["variant"] == "topk" and summary["k"] == 4 and summary["l0"] == pytest.approx(4.0)
    assert summary["eval_tokens"] > 0 and summary["ce_sae"] > 0 and summary["fvu"] > 0


def test_sae_path_is_checked_before_compute(tmp_path, trained):
    from interpflow.workflows.spec import SpecError, load_spec

    save_folder(trained["topk"], tmp_path / "narrow")                    # d_in=16; the default site is 64 wide
    with pytest.raises(SpecError, match=r"sae.path: the SAE's d_in=16 .* does not match the width 64 of site "
                                        r"'blocks.1.resid_post'"):
        load_spec("sae", [f"sae.path={tmp_path / 'narrow'}"], check_store=False)
    cfg = json.loads((tmp_path / "narrow" / "cfg.json").read_text())
    (tmp_path / "narrow" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "matryoshka"}))
    with pytest.raises(SpecError, match=r"unknown architecture 'matryoshka'"):
        load_spec("sae", [f"sae.path={tmp_path / 'narrow'}"], check_store=False)
