"""This project's EK-FAC (full gradients, and LoGra) against kronfluence 1.0.1's EK-FAC on the same model
and data (issue #32's anchor), kronfluence run in its own venv, never a project dependency:

    python -m venv /tmp/anchor && /tmp/anchor/bin/pip install torch==2.13.0 kronfluence==1.0.1 transformers==5.24.0
    /tmp/anchor/bin/pip uninstall -y torchvision        # pulled in at a version that does not match torch 2.13
    python benchmarks/influence_kronfluence.py --anchor-python /tmp/anchor/bin/python [--n 200 --layers 2 --width 128]

The model is the scale benchmark's GPT-2 shape with random weights, both MLP matrices of every block
(kronfluence tracks nn.Linear only, so GPT-2's Conv1D are converted to nn.Linear there; kronfluence also
counts their biases, this project's selection the weights only), empirical Fisher on both sides, 20
queries, mean score over queries. Printed: seconds per method (each in its own process, one after the
other) and Spearman correlations. kronfluence's score is +g_q^T H^-1 g_i, this project's -g_q^T H^-1 g_i
(the estimated increase of the measurement), so agreement shows as a correlation near -1 against it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def kronfluence_side(work: str) -> None:
    import json, time, torch, torch.nn.functional as F
    from safetensors.torch import load_file
    import transformers
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    torch.set_num_threads(2)
    data = load_file(f"{work}/data.safetensors")
    model = transformers.GPT2LMHeadModel.from_pretrained(f"{work}/model").eval()
    def linearize(module):
        """kronfluence tracks nn.Linear / nn.Conv2d: GPT-2's Conv1D (W stored as (in, out)) becomes an nn.Linear."""
        for name, child in module.named_children():
            if type(child).__name__ == "Conv1D":
                lin = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                lin.weight.data, lin.bias.data = child.weight.data.T.contiguous(), child.bias.data.clone()
                setattr(module, name, lin)
            else:
                linearize(child)
    linearize(model)
    names = [n for n, mod in model.named_modules() if n.endswith(("mlp.c_fc", "mlp.c_proj"))]

    def per_example(model, ids, labels=None):
        logits = model(input_ids=ids).logits[:, :-1]
        target = ids[:, 1:] if labels is None else labels
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").reshape(target.shape).mean(1)

    class LM(Task):
        def compute_train_loss(self, batch, model, sample=False):
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(model(input_ids=batch).logits[:, :-1].detach(), -1)
                    labels = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(probs.shape[:2])
                return per_example(model, batch, labels).sum()
            return per_example(model, batch).sum()
        def compute_measurement(self, batch, model):
            return -per_example(model, batch).sum()
        def get_influence_tracked_modules(self):
            return names

    class DS(torch.utils.data.Dataset):
        def __init__(self, x): self.x = x
        def __len__(self): return len(self.x)
        def __getitem__(self, i): return self.x[i]

    task = LM()
    model = prepare_model(model, task)
    an = Analyzer(analysis_name="anchor", model=model, task=task, output_dir=f"{work}/out", disable_tqdm=True)
    t = time.perf_counter()
    an.fit_all_factors(factors_name="ekfac", dataset=DS(data["train"]), per_device_batch_size=32,
                       factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True), overwrite_output_dir=True)
    an.compute_pairwise_scores(scores_name="s", factors_name="ekfac", query_dataset=DS(data["query"]),
                               train_dataset=DS(data["train"]), per_device_query_batch_size=20,
                               per_device_train_batch_size=32, overwrite_output_dir=True)
    s = an.load_pairwise_scores("s")["all_modules"]       # (queries, train)
    seconds = time.perf_counter() - t
    json.dump({"kf_ekfac": s.double().mean(0).tolist(), "kf_s": seconds}, open(f"{work}/kf.json", "w"))
    print("kronfluence seconds", seconds)


def ours(args: argparse.Namespace, work: str) -> dict:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).parent))
    import influence_scale as b
    from interpflow.tasks.influence import (
        CausalLMTask, LograConfig, LograProjection, PreconditionerConfig, fit_on_batches, fit_projected, influence,
        per_example_grads, select_parameters,
    )

    torch.set_num_threads(args.threads)
    n, length, vocab = args.n, 64, 2048
    m = b.model(args.layers, args.width, vocab, length)
    m.save_pretrained(f"{work}/model")
    train = b.batch(list(range(n)), length, vocab)
    query = b.batch(list(range(10**9, 10**9 + 20)), length, vocab)
    save_file({"train": train["input_ids"], "query": query["input_ids"]}, f"{work}/data.safetensors")
    sel, task, ek = select_parameters(m, b.PARAMS), CausalLMTask(), PreconditionerConfig(strategy="ekfac")
    batches = [b.batch(list(range(s, min(s + 32, n))), length, vocab) for s in range(0, n, 32)]
    out = {}
    t = time.perf_counter()
    pre = fit_on_batches(ek, m, task, batches, sel, chunk_size=8)
    tr = [per_example_grads(m, task, x, sel, chunk_size=8) for x in batches]
    q = per_example_grads(m, task, query, sel, kind="measurement", chunk_size=8).grads
    out["full"], out["full_s"] = influence(q, tr, pre).column("score").to_pylist(), time.perf_counter() - t
    t = time.perf_counter()
    lg = LograProjection(LograConfig(rank_in=args.rank, rank_out=args.rank), m, sel)
    pre = fit_projected(ek, lg, m, task, batches)
    tr = [lg.grads(m, task, x)[0] for x in batches]
    ql = lg.grads(m, task, query, kind="measurement")[0].grads
    out["logra"], out["logra_s"] = influence(ql, tr, pre).column("score").to_pylist(), time.perf_counter() - t
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--anchor-python", default="/tmp/anchor/bin/python")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--_kronfluence", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._kronfluence:
        return kronfluence_side(args._kronfluence)
    from scipy.stats import spearmanr

    work = tempfile.mkdtemp(prefix="kronfluence-anchor-")
    o = ours(args, work)
    subprocess.run([args.anchor_python, __file__, "--_kronfluence", work], check=True)
    k = json.loads(Path(f"{work}/kf.json").read_text())
    print(f"N={args.n}, {args.layers} blocks x {args.width}, LoGra {args.rank}x{args.rank}, 20 queries")
    print(f"seconds: full-gradient EK-FAC {o['full_s']:.1f}, LoGra EK-FAC {o['logra_s']:.1f}, "
          f"kronfluence EK-FAC {k['kf_s']:.1f}  (kronfluence / full {k['kf_s'] / o['full_s']:.2f}, "
          f"LoGra / kronfluence speed {k['kf_s'] / o['logra_s']:.1f}x)")
    print(f"Spearman against kronfluence EK-FAC (near -1 = agree, see docstring): full {spearmanr(o['full'], k['kf_ekfac']).statistic:.3f}, "
          f"LoGra {spearmanr(o['logra'], k['kf_ekfac']).statistic:.3f}; LoGra against full {spearmanr(o['logra'], o['full']).statistic:.3f}")


if __name__ == "__main__":
    main()
