"""How attribution cost grows with the training set (issue #32): a scale curve for LoGra, against
full-gradient EK-FAC and the dense projection run in the same process.

A GPT-2-shaped model (default 6 blocks x 256 wide, ~5 M parameters without embeddings; random weights:
timing does not depend on training) and N training examples of ``--length`` random tokens, 100 queries.
Per N, in a fresh subprocess per worker count (so that peak memory is that N's own): LoGra gradients and
projected K-FAC covariances in one pass, each shard committed to disk as safetensors, EK-FAC eigenvalues
from the stored shards, then streamed scores (per query top-k + per-example mean) shard by shard.
Printed: wall time, compute time (without process start and model load) and examples/s on it, peak RSS (driver = the process that scores; workers = the processes that
compute gradients), bytes on disk per example, and the fitted exponents of time, disk and memory in N
(log-log least squares: 1 = linear, 0 = flat).

The baseline (same process, smallest N capped at ``--baseline-n``): full-gradient EK-FAC (vmap
per-example gradients, covariance pass, lambda pass) and the dense projection; printed as throughput
ratios against LoGra, with the Spearman correlation of each method's EK-FAC scores against full
EK-FAC's. Also the float32 vs float64 ``lambda_stats`` comparison (time and score change).

    python benchmarks/influence_scale.py                       # N = 500, 1000, 2000: a few minutes on 2 cores
    python benchmarks/influence_scale.py --n 10000 50000 200000 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARAMS = ["transformer.h.*.mlp.c_fc.weight", "transformer.h.*.mlp.c_proj.weight"]


def model(layers: int, width: int, vocab: int, length: int):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64), vocab_size=vocab,
                                  n_positions=length, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def batch(ids: list[int], length: int, vocab: int):
    """Deterministic tokens per example id (any worker builds the same example)."""
    import torch

    rows = [torch.randint(1, vocab, (length,), generator=torch.Generator().manual_seed(int(i))) for i in ids]
    return {"id": torch.tensor(ids), "input_ids": torch.stack(rows), "attention_mask": torch.ones(len(ids), length,
                                                                                                  dtype=torch.long)}


def rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shard_worker(args: argparse.Namespace, shard_ids: list[list[int]], out: str) -> None:
    """Gradient pass of LoGra over the given shards: one safetensors file per shard (grads + covariance)."""
    import torch
    from safetensors.torch import save_file

    from interpflow.tasks.influence import CausalLMTask, LograConfig, LograProjection, select_parameters
    from interpflow.tasks.influence.precondition import sum_stats

    torch.set_num_threads(args.threads)
    m = model(args.layers, args.width, args.vocab, args.length)
    logra = LograProjection(LograConfig(rank_in=args.rank, rank_out=args.rank), m, select_parameters(m, PARAMS))
    started = time.perf_counter()
    for ids in shard_ids:
        parts = [logra.grads(m, CausalLMTask(), batch(ids[s:s + args.batch], args.length, args.vocab), covariance=True)
                 for s in range(0, len(ids), args.batch)]
        grads = torch.cat([g.grads for g, _ in parts])
        cov = sum_stats(c for _, c in parts).to_tensors()
        save_file({"ids": torch.tensor(ids), "grads": grads, **{f"cov.{k}": v.contiguous() for k, v in cov.items()}},
                  f"{out}/shard-{ids[0]:09d}.safetensors")
    print(json.dumps({"rss_mb": rss_mb(), "compute_s": time.perf_counter() - started}))


def run_n(args: argparse.Namespace, n: int, workers: int) -> dict:
    """One point of the curve (runs in its own process)."""
    import torch
    from safetensors.torch import load_file

    from interpflow.tasks.influence import (
        CausalLMTask, CovarianceStats, KroneckerStats, LograConfig, LograProjection, PerExampleGrads,
        PreconditionerConfig, StreamingScores, eigendecompose, fit, lambda_stats, select_parameters,
    )
    from interpflow.tasks.influence.precondition import sum_stats

    torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix=f"scale-{n}-")
    shards = [list(range(s, min(s + args.shard, n))) for s in range(0, n, args.shard)]
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--_worker", out, json.dumps(shards[w::workers]),
                               *sys.argv[1:]], stdout=subprocess.PIPE, text=True) for w in range(workers)]
    reports = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    worker_rss = [r["rss_mb"] for r in reports]
    if any(p.returncode for p in procs):
        raise RuntimeError("a gradient worker failed")
    grad_s = time.perf_counter() - started
    files = sorted(Path(out).glob("shard-*.safetensors"))
    disk = sum(f.stat().st_size for f in files)
    m = model(args.layers, args.width, args.vocab, args.length)
    logra = LograProjection(LograConfig(rank_in=args.rank, rank_out=args.rank), m, select_parameters(m, PARAMS))
    t0 = time.perf_counter()
    cov = sum_stats(CovarianceStats.from_tensors({k[4:]: v for k, v in load_file(str(f)).items() if k.startswith("cov.")})
                    for f in files)
    stats = KroneckerStats(logra.space, eigendecompose(cov, logra.space_layers))
    stats.lambdas = sum_stats(lambda_stats(stats.basis, load_file(str(f))["grads"], logra.space) for f in files)
    pre = fit(PreconditionerConfig(strategy="ekfac"), stats)
    queries = logra.grads(m, CausalLMTask(), batch(list(range(10**9, 10**9 + args.queries)), args.length, args.vocab),
                          kind="measurement")[0].grads
    acc = StreamingScores(queries, k=10, preconditioner=pre, method="logra[ekfac]")
    for f in files:                                        # one shard in memory at a time
        t = load_file(str(f))
        acc.add(PerExampleGrads(t["ids"], t["grads"]))
    scores = acc.table()
    score_s = time.perf_counter() - t0
    wall = time.perf_counter() - started
    for f in files:
        f.unlink()
    os.rmdir(out)
    assert scores.num_rows == n
    compute = max(r["compute_s"] for r in reports) + score_s       # without process start and model load
    return {"n": n, "workers": workers, "wall_s": wall, "grad_s": grad_s, "score_s": score_s, "compute_s": compute,
            "ex_per_s": n / compute,
            "driver_rss_mb": rss_mb(), "worker_rss_mb": max(worker_rss), "disk_bytes_per_example": disk / n}


def baseline(args: argparse.Namespace, n: int) -> list[dict]:
    """Full-gradient EK-FAC, dense projection + EK-FAC (query preconditioned in parameter space), and LoGra
    EK-FAC on the same n examples, in this process: seconds and Spearman against full EK-FAC."""
    import torch
    from scipy.stats import spearmanr

    from interpflow.tasks.influence import (
        CausalLMTask, LograConfig, LograProjection, PreconditionerConfig, ProjectionConfig, RandomProjection,
        fit_on_batches, fit_projected, influence, per_example_grads, select_parameters,
    )

    torch.set_num_threads(args.threads)
    m = model(args.layers, args.width, args.vocab, args.length)
    sel = select_parameters(m, PARAMS)
    batches = [batch(list(range(s, min(s + args.batch, n))), args.length, args.vocab) for s in range(0, n, args.batch)]
    qb = batch(list(range(10**9, 10**9 + args.queries)), args.length, args.vocab)
    task, ekfac = CausalLMTask(), PreconditionerConfig(strategy="ekfac")
    rows, scores = [], {}

    t0 = time.perf_counter()
    pre = fit_on_batches(ekfac, m, task, batches, sel, chunk_size=8)
    full_train = [per_example_grads(m, task, b, sel, chunk_size=8) for b in batches]
    q = per_example_grads(m, task, qb, sel, kind="measurement", chunk_size=8).grads
    scores["full"] = influence(q, full_train, pre)
    rows.append({"method": "full EK-FAC", "seconds": time.perf_counter() - t0})

    t0 = time.perf_counter()
    proj = RandomProjection(ProjectionConfig(dim=args.dense_dim), sel)
    train = [per_example_grads(m, task, b, sel, projection=proj, chunk_size=8) for b in batches]
    rows.append({"method": f"dense projection (dim {args.dense_dim}) grads only", "seconds": time.perf_counter() - t0})

    t0 = time.perf_counter()
    logra = LograProjection(LograConfig(rank_in=args.rank, rank_out=args.rank), m, sel)
    pre = fit_projected(ekfac, logra, m, task, batches)          # gradients + covariances, lambdas from them
    train = [logra.grads(m, task, b)[0] for b in batches]          # (a workflow stores them from the first pass)
    ql = logra.grads(m, task, qb, kind="measurement")[0].grads
    scores["logra"] = influence(ql, train, pre)
    rows.append({"method": f"LoGra EK-FAC (rank {args.rank}x{args.rank}, 2 passes here)", "seconds": time.perf_counter() - t0})

    full = scores["full"].column("score").to_numpy()
    for r in rows:
        r["ex_per_s"] = n / r["seconds"]
    rows[0]["spearman"] = 1.0
    rows[2]["spearman"] = float(spearmanr(full, scores["logra"].column("score").to_numpy()).statistic)

    # lambda_stats in float64 (as shipped) against float32: time, and how much the scores move
    from interpflow.tasks.influence import KroneckerStats, covariance_stats, eigendecompose, fit, kronecker_layers
    from interpflow.tasks.influence.kfac import LambdaStats, layer_matrices
    from interpflow.tasks.influence.precondition import sum_stats

    layers = kronecker_layers(m, sel)
    basis = eigendecompose(sum_stats(covariance_stats(m, task, b, layers) for b in batches), layers)
    flat = [g.grads for g in full_train]
    out = {}
    for dtype in (torch.float64, torch.float32):
        t0 = time.perf_counter()
        sums = {l.module: 0 for l in layers}
        for g in flat:
            per = sel.unflatten(g.to(dtype))
            for l in layers:
                r = basis.qs[l.module].T.to(dtype) @ layer_matrices(l, per) @ basis.qa[l.module].to(dtype)
                sums[l.module] = sums[l.module] + r.pow(2).sum(dim=0).double()
        seconds = time.perf_counter() - t0
        pre = fit(ekfac, KroneckerStats(sel, basis, LambdaStats(sums, n)))
        out[str(dtype)] = (seconds, influence(q, full_train, pre).column("score").to_numpy())
    (t64, s64), (t32, s32) = out["torch.float64"], out["torch.float32"]
    rel = float(abs(s64 - s32).max() / abs(s64).max())
    rows.append({"method": "lambda_stats float64 -> float32", "seconds": t32, "speedup": t64 / t32,
                 "max_rel_score_change": rel, "spearman": float(spearmanr(s64, s32).statistic)})
    return rows


def exponent(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-12)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[500, 1000, 2000])
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="gradient processes (the actors' stand-in)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shard", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline-n", type=int, default=100, help="examples of the in-process baseline")
    p.add_argument("--dense-dim", type=int, default=128, help="dense projection width (its matrix is p x dim)")
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--_point", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        return shard_worker(args, json.loads(args._worker[1]), args._worker[0])
    if args._point:
        print(json.dumps(run_n(args, *args._point)))
        return
    argv = [a for a in sys.argv[1:]]
    m = model(args.layers, args.width, args.vocab, args.length)
    n_params = sum(p.numel() for p in m.parameters())
    print(f"model: {args.layers} blocks x {args.width}, {n_params / 1e6:.1f} M parameters; {args.length} tokens/example; "
          f"LoGra rank {args.rank}x{args.rank} on {PARAMS}; {args.queries} queries; {args.threads} thread(s)/process")
    print("\nbaseline, same process, N =", min(args.baseline_n, min(args.n)))
    base = baseline(args, min(args.baseline_n, min(args.n)))
    for r in base:
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    full, logra = base[0], base[2]
    print(f"  LoGra EK-FAC / full EK-FAC throughput: {logra['ex_per_s'] / full['ex_per_s']:.1f}x "
          f"(Spearman {logra['spearman']:.3f})")
    print("\nscale curve (LoGra, EK-FAC in the projected space, streamed scores)")
    curve = []
    for workers in args.workers:
        for n in args.n:
            res = subprocess.run([sys.executable, __file__, "--_point", str(n), str(workers), *argv],
                                 capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(res.stderr[-3000:])
            row = json.loads(res.stdout.strip().splitlines()[-1])
            curve.append(row)
            print(f"  N={n:>7} workers={workers}  wall {row['wall_s']:8.1f} s (compute {row['compute_s']:7.1f} s: "
                  f"gradients {row['compute_s'] - row['score_s']:.1f}, scores {row['score_s']:.1f})  "
                  f"{row['ex_per_s']:7.1f} ex/s  "
                  f"driver peak {row['driver_rss_mb']:6.0f} MB  worker peak {row['worker_rss_mb']:6.0f} MB  "
                  f"disk {row['disk_bytes_per_example']:7.0f} B/example  (vs full EK-FAC: "
                  f"{row['ex_per_s'] / full['ex_per_s']:.1f}x)", flush=True)
        rows = [r for r in curve if r["workers"] == workers]
        if len(rows) > 1:
            ns = [r["n"] for r in rows]
            print(f"  fitted exponents in N (workers={workers}): compute time "
                  f"{exponent(ns, [r['compute_s'] for r in rows]):.2f}, wall time {exponent(ns, [r['wall_s'] for r in rows]):.2f}, "
                  f"disk {exponent(ns, [r['disk_bytes_per_example'] * r['n'] for r in rows]):.2f}, driver memory "
                  f"{exponent(ns, [r['driver_rss_mb'] for r in rows]):.2f}, worker memory "
                  f"{exponent(ns, [r['worker_rss_mb'] for r in rows]):.2f}")


if __name__ == "__main__":
    main()
