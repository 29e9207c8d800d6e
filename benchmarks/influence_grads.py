"""Per-example gradients: ``torch.func`` (vmap over grad) against a per-example autograd loop.

Prints, for the same tiny GPT-2 (random weights), the same padded batches, the same selected parameters
and thread count, in one process: examples/s of ``per_example_grads`` (vmap) and of
``loop_per_example_grads`` (one forward/backward per example), their ratio (target >= 5x), and the
largest absolute difference between the two gradients (they must agree to <= 1e-5).

    python benchmarks/influence_grads.py [--examples 256] [--batch 64] [--threads 1] [--kind train_loss]
"""

from __future__ import annotations

import argparse
import time


def tiny_gpt2(layers: int, width: int, positions: int):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=2, vocab_size=50, n_positions=positions,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def batches(examples: int, batch: int, length: int):
    """Right-padded batches with ragged lengths and a 3-token prompt left out of the loss."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for start in range(0, examples, batch):
        n = min(batch, examples - start)
        ids = torch.randint(2, 50, (n, length), generator=gen)
        lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
        attn = (torch.arange(length)[None] < lengths[:, None]).long()
        loss = attn.clone()
        loss[:, :3] = 0
        ids[attn == 0] = 1
        out.append({"id": torch.arange(start, start + n), "input_ids": ids, "attention_mask": attn, "loss_mask": loss})
    return out


def timed(fn, data) -> tuple[float, list]:
    start = time.perf_counter()
    results = [fn(b) for b in data]
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kind", choices=["train_loss", "measurement"], default="train_loss",
                        help="train_loss: causal-LM loss; measurement: the concept projection on blocks.0.resid_post")
    parser.add_argument("--params", nargs="+", default=["transformer.h.*.mlp.*", "transformer.h.*.attn.c_attn.weight"])
    args = parser.parse_args()

    import torch

    from interpflow.tasks.influence import (
        CausalLMTask, ConceptTask, loop_per_example_grads, per_example_grad_dict, select_parameters,
    )

    torch.set_num_threads(args.threads)
    model = tiny_gpt2(args.layers, args.width, args.length)
    selection = select_parameters(model, args.params)
    task = CausalLMTask() if args.kind == "train_loss" else ConceptTask("blocks.0.resid_post", torch.randn(args.width))
    data = batches(args.examples, args.batch, args.length)

    def fast(b):
        return per_example_grad_dict(model, task, b, selection, kind=args.kind)

    def slow(b):
        return loop_per_example_grads(model, task, b, selection, kind=args.kind)

    fast(data[0]), slow({k: v[:2] for k, v in data[0].items()})          # warm up both paths
    t_fast, g_fast = timed(fast, data)
    t_slow, g_slow = timed(slow, data)
    diff = max(float((a[k] - b[k]).abs().max()) for a, b in zip(g_fast, g_slow) for k in a)
    n = args.examples
    print(f"tiny GPT-2 (n_layer={args.layers}, n_embd={args.width}), {n} examples of <= {args.length} tokens, "
          f"batch {args.batch}, {args.threads} thread(s), {args.kind}, {selection.numel} parameters "
          f"({len(selection.names)} tensors)")
    print(f"{'method':<26} {'seconds':>8} {'examples/s':>11}")
    print(f"{'vmap(grad) per batch':<26} {t_fast:8.3f} {n / t_fast:11.1f}")
    print(f"{'autograd loop':<26} {t_slow:8.3f} {n / t_slow:11.1f}")
    print(f"ratio vmap / loop: {t_slow / t_fast:.1f}x (target >= 5x); max |vmap - loop| = {diff:.2e}")


if __name__ == "__main__":
    main()
