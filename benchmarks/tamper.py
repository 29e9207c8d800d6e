"""Tamper resistance (issue #11), measured: sweep trials per hour on Ray Tune at 1 and 2 concurrent trials
against a plain in-process loop, where a trial's time goes, and LoRA vs full fine-tuning per step.

Prints, on the embedded aligned model (a tiny GPT-2 trained once, outside the measurements, on the
embedded world's aligned corpus; settings printed):
- trials/hour of one attack sweep (lora_finetune, --sweep-steps fine-tuning steps, a 2-dim search space:
  finetune.lr loguniform and finetune.lora.r choice, --trials trials) through `workflows.sweep.run_sweep`
  with SweepSettings(concurrent_trials=1) and then =2, each into a fresh temporary store (its own
  NodeContext, no MLflow), and the ratio 2 vs 1; the same trials (the values the 1-trial sweep drew) run
  as a plain in-process loop over `run_trial` (the baseline without Tune, no commits) and Tune's overhead
  ratio (sweep wall time / loop wall time at 1 trial at a time). A Tune trial holds 1 CPU, so torch runs
  1 thread in it; the loop runs on 1 torch thread too. The Ray cluster is this benchmark's own (2 CPUs)
  and is started, and Tune imported, before the clock starts; each Tune trial still starts its own
  worker process (imports included), and commits its outputs (model folder, replies) to the store;
- per attack (full_finetune, lora_finetune, refusal_ablation, embedding_attack at their registry
  defaults, --attack-steps overriding the fine-tuning and soft-prompt steps if given), one trial
  in-process: the seconds of the attack (training, for fine-tuning attacks), generation, judging,
  utility and the rest (model load), and their shares of the trial;
- `tasks.finetune.finetune` with the engine's `LocalTrainContext`, method=full vs method=lora (r=8), same
  data (the harmful attack set) and --compare-steps steps, batch 16: seconds per optimizer step (the loop
  only: model load, tokenising, adapter insertion and the LoRA merge are left out), the fastest of
  --repeats alternating runs, and the ratio.

    python benchmarks/tamper.py [--trials 4] [--sweep-steps 20] [--compare-steps 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

ATTACKS = ("full_finetune", "lora_finetune", "refusal_ablation", "embedding_attack")


@contextlib.contextmanager
def scratch_tmp(path: str):
    """`run_trial` makes a work folder per trial with `tempfile.mkdtemp` and leaves it (the sweep commits
    from it): keep those folders under the benchmark's own temporary directory."""
    old = tempfile.tempdir
    os.makedirs(path, exist_ok=True)
    tempfile.tempdir = path
    try:
        yield
    finally:
        tempfile.tempdir = old


def train_aligned(world, lm_cfg, out: str) -> dict:
    from interpflow.tasks import tiny_lm
    from interpflow.tasks.tamper.world import make_aligned_corpus

    started = time.perf_counter()
    result = tiny_lm.train(lm_cfg, make_aligned_corpus(world))
    result["model"].save_pretrained(out)
    return {**result["metrics"], "seconds": time.perf_counter() - started}


def sweep_compute(model: str, prompts: list, questions, evaluation, baseline_utility: float, base, scratch: str):
    """The compute function of `workflows.tamper.sweep_attack`, plus the torch thread count it ran with."""

    def compute(values: dict) -> dict:
        import torch

        from interpflow.tasks.tamper.attacks.base import with_values
        from interpflow.tasks.tamper.trial import run_trial
        from interpflow.tasks.tamper.utility import load_mc_dataset

        data = load_mc_dataset(evaluation.utility, default=questions)
        with scratch_tmp(scratch):
            out = run_trial(with_values(base, values), model, prompts, data, evaluation, baseline_utility)
        out["metrics"]["torch_threads"] = torch.get_num_threads()
        return out

    return compute


def tune_sweep(concurrent: int, store: str, compute, base, space: dict, trials: int) -> dict:
    from interpflow.workflows.engine.execute import NodeContext
    from interpflow.workflows.sweep import SweepSettings, run_sweep

    node = NodeContext(store, "sweep.aligned.lora_finetune", f"benchmark{concurrent:02d}" + "0" * 50,
                       f"bench-run-{concurrent}", None, None)
    identity = {"model": "aligned", "attack": base.model_dump(), "benchmark": True}
    started = time.perf_counter()
    outcomes = run_sweep(node, identity, space, trials, SweepSettings(concurrent_trials=concurrent), compute)
    seconds = time.perf_counter() - started
    load = os.getloadavg()[0]
    failed = [o for o in outcomes if o.status != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} trial(s) of the {concurrent}-trial sweep failed: "
                           f"{failed[0].metrics.get('error')}")
    return {"seconds": seconds, "outcomes": outcomes, "load": load}


def plain_loop(values_list: list[dict], compute) -> dict:
    started = time.perf_counter()
    metrics = [compute(values)["metrics"] for values in values_list]
    return {"seconds": time.perf_counter() - started, "metrics": metrics}


def attack_shares(names, steps: int | None, model: str, prompts, questions, evaluation, baseline_utility: float,
                  scratch: str) -> dict:
    from interpflow.tasks.tamper.attacks import attack_config
    from interpflow.tasks.tamper.trial import run_trial

    out = {}
    for name in names:
        values = {}
        if steps is not None and name.endswith("_finetune"):
            values = {"finetune": {"steps": steps}}
        elif steps is not None and name in ("embedding_attack", "latent_attack"):
            values = {"steps": steps}
        attack = attack_config(name, values)
        with scratch_tmp(scratch):
            m = run_trial(attack, model, prompts, questions, evaluation, baseline_utility)["metrics"]
        detail = (f"{attack.finetune.method}, {attack.finetune.steps} steps x batch {attack.finetune.batch_size}"
                  if hasattr(attack, "finetune") else
                  f"{attack.steps} steps" if hasattr(attack, "steps") else
                  f"layer {int(m.get('attack.layer', -1))}" if name == "refusal_ablation" else "")
        out[name] = {**m, "detail": detail}
    return out


def step_times(model: str, world, steps: int, repeats: int) -> dict:
    """Seconds per optimizer step of `finetune`'s loop, method full vs lora (fastest of `repeats`)."""
    from interpflow.tasks.finetune import FinetuneConfig, LoraSettings, finetune
    from interpflow.tasks.tamper.world import AttackData, make_attack_data
    from interpflow.workflows.engine.training import LocalTrainContext

    class Timed(LocalTrainContext):
        """`prepare` is called right before the training loop, `report` (checkpoint_every = steps) at its end."""

        def prepare(self, model):
            self.began = time.perf_counter()
            return super().prepare(model)

        def report(self, step, metrics, state=None):
            self.ended = time.perf_counter()
            super().report(step, metrics, state)

    data = make_attack_data(AttackData(kind="harmful", world=world))
    cfgs = {"full": FinetuneConfig(steps=steps, batch_size=16, lr=1e-3, checkpoint_every=steps),
            "lora": FinetuneConfig(steps=steps, batch_size=16, lr=5e-3, method="lora", lora=LoraSettings(r=8),
                                   checkpoint_every=steps)}
    best = {m: float("inf") for m in cfgs}
    info = {}
    for _ in range(repeats):
        for method, cfg in cfgs.items():
            ctx = Timed()
            result = finetune(cfg, train=ctx, model=model, data=data)
            best[method] = min(best[method], (ctx.ended - ctx.began) / steps)
            info[method] = {"train_s": result["metrics"]["train_s"], "loss": result["metrics"]["train_loss"],
                            "trainable": result["metrics"].get("trainable_params",
                                                               sum(p.numel() for p in result["model"].model.parameters()))}
    return {"per_step": best, "info": info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per sweep")
    parser.add_argument("--sweep-steps", type=int, default=20, help="fine-tuning steps of the swept lora_finetune")
    parser.add_argument("--attack-steps", type=int, default=None,
                        help="override the attacks' fine-tuning / soft-prompt steps in the shares part "
                             "(default: the registry defaults)")
    parser.add_argument("--compare-steps", type=int, default=30, help="steps per LoRA vs full fine-tuning run")
    parser.add_argument("--repeats", type=int, default=2, help="LoRA vs full runs per method; the fastest is shown")
    parser.add_argument("--lm-steps", type=int, default=300, help="training steps of the aligned tiny LM")
    parser.add_argument("--dialogues", type=int, default=3000, help="aligned dialogues the tiny LM is trained on")
    parser.add_argument("--eval-prompts", type=int, default=24, help="held-out harmful requests per evaluation")
    parser.add_argument("--attack-examples", type=int, default=200, help="examples in each attack dataset")
    args = parser.parse_args()
    total_started = time.perf_counter()
    cores = os.cpu_count()
    print(f"tamper benchmark: this machine has {cores} cores, 1-min load average {os.getloadavg()[0]:.2f} at the "
          f"start", flush=True)

    import ray
    import torch

    from interpflow.tasks import tiny_lm
    from interpflow.tasks.tamper.attacks import attack_config
    from interpflow.tasks.tamper.trial import Evaluation, run_trial
    from interpflow.tasks.tamper.utility import UtilityConfig
    from interpflow.tasks.tamper.world import SYSTEM, WorldConfig, eval_prompts, utility_questions
    from interpflow.workflows.sweep import SearchDimension

    world = WorldConfig(aligned_dialogues=args.dialogues, eval_prompts=args.eval_prompts,
                        attack_examples=args.attack_examples)
    lm_cfg = tiny_lm.TinyLMConfig(n_layer=4, n_embd=128, n_positions=128, steps=args.lm_steps, threads=2)
    evaluation = Evaluation(world=world, utility=UtilityConfig(system=SYSTEM))      # as TamperStudy builds it
    base = attack_config("lora_finetune", {"finetune": {"steps": args.sweep_steps}})
    space = {"finetune.lr": SearchDimension(kind="loguniform", low=5e-4, high=1e-2),
             "finetune.lora.r": SearchDimension(kind="choice", values=[4, 8, 16])}

    with tempfile.TemporaryDirectory() as tmp:
        model = f"{tmp}/aligned"
        trained = train_aligned(world, lm_cfg, model)
        torch.set_num_threads(1)                # every measurement below: 1 torch thread, as in a 1-CPU trial
        prompts = eval_prompts(world).to_list()
        questions = utility_questions(world)
        with scratch_tmp(f"{tmp}/scratch"):
            aligned = run_trial(attack_config("none"), model, prompts, questions, evaluation, 0.0)["metrics"]
        compute = sweep_compute(model, prompts, questions, evaluation, float(aligned["utility"]), base,
                                f"{tmp}/scratch")

        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        try:
            import optuna  # noqa: F401  (imported before the clock starts)
            from ray import tune  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch  # noqa: F401

            sweeps = {c: tune_sweep(c, f"{tmp}/store-{c}", compute, base, space, args.trials) for c in (1, 2)}
        finally:
            ray.shutdown()
        drawn = [o.values for o in sweeps[1]["outcomes"]]
        loop = plain_loop(drawn, compute)
        shares = attack_shares(ATTACKS, args.attack_steps, model, prompts, questions, evaluation,
                               float(aligned["utility"]), f"{tmp}/scratch")
        steps = step_times(model, world, args.compare_steps, args.repeats)

    print(f"embedded aligned model: tiny GPT-2 {lm_cfg.n_layer} blocks x {lm_cfg.n_embd}, context "
          f"{lm_cfg.n_positions}, {lm_cfg.steps} steps x batch {lm_cfg.batch_size} on WorldConfig(aligned_dialogues="
          f"{world.aligned_dialogues}, eval_prompts={world.eval_prompts}, attack_examples={world.attack_examples}) "
          f"(trained once in {trained['seconds']:.0f} s on 2 threads, final loss {trained.get('final_loss', float('nan')):.3f}); "
          f"unattacked: harm {aligned['harm']:.3f}, refusal rate {aligned['refusal_rate']:.2f}, utility "
          f"{aligned['utility']:.2f} (chance {aligned['utility_chance']:.2f})")
    print(f"evaluation per trial: {len(prompts)} held-out harmful requests x {evaluation.safety.max_tokens} greedy "
          f"tokens, rubric judge, {len(questions)} utility questions x {world.mc_options} options")
    print(f"sweep: lora_finetune ({args.sweep_steps} steps x batch {base.finetune.batch_size}, r in {{4, 8, 16}}, lr "
          f"loguniform 5e-4..1e-2), {args.trials} trials, TPE seed 0, 1 CPU per trial, a fresh store per sweep:")
    one = None
    for c in (1, 2):
        s = sweeps[c]
        n = len(s["outcomes"])
        per_hour = 3600 * n / s["seconds"]
        one = one or per_hour
        mean = {k: sum(o.metrics[k] for o in s["outcomes"]) / n for k in ("trial_s", "attack_s", "generate_s")}
        threads = sorted({int(o.metrics.get("torch_threads", 0)) for o in s["outcomes"]})
        print(f"  Tune, {c} concurrent trial{'s' if c > 1 else ' '}: {per_hour:6.0f} trials/hour  x{per_hour / one:4.2f} "
              f"vs 1  ({n} trials in {s['seconds']:5.1f} s wall; inside a trial run_trial {mean['trial_s']:4.1f} s mean, "
              f"of which attack {mean['attack_s']:4.1f} s, generation {mean['generate_s']:4.1f} s; torch threads "
              f"{threads}; 1-min load {s['load']:.1f} at the end)")
    same = sorted(map(str, drawn)) == sorted(str(o.values) for o in sweeps[2]["outcomes"])
    print(f"  (the 2-trial sweep drew {'the same values as' if same else 'other values than'} the 1-trial sweep)")
    n = len(drawn)
    loop_per_hour = 3600 * n / loop["seconds"]
    loop_mean = {k: sum(m[k] for m in loop["metrics"]) / n for k in ("trial_s", "attack_s", "generate_s")}
    print(f"  plain in-process loop over run_trial (same {n} trials, 1 thread, no commits): {loop_per_hour:6.0f} "
          f"trials/hour ({loop['seconds']:5.1f} s; run_trial {loop_mean['trial_s']:4.1f} s mean, of which attack "
          f"{loop_mean['attack_s']:4.1f} s, generation {loop_mean['generate_s']:4.1f} s)")
    tuned = sweeps[1]
    inside = sum(o.metrics["trial_s"] for o in tuned["outcomes"]) / n
    print(f"  Tune overhead at 1 trial at a time: sweep wall / loop wall = x{tuned['seconds'] / loop['seconds']:.2f} "
          f"(+{(tuned['seconds'] - loop['seconds']) / n:.1f} s per trial: {(tuned['seconds'] / n - inside):.1f} s "
          f"outside run_trial (Tune's loop, TPE, the trial's worker process and actor, the commit) and "
          f"{inside - loop_mean['trial_s']:+.1f} s inside it (a fresh process's first calls: lazy imports, "
          f"warm-up; and any CPU contention)); 2 concurrent trials vs the loop: "
          f"x{loop['seconds'] / sweeps[2]['seconds']:.2f} throughput")
    print(f"  ({cores} cores here: 2 concurrent trials can be at most x{min(2, cores or 1)} faster than 1)")
    print("where a trial's time goes (one trial per attack in-process, 1 thread; attack = training for fine-tuning "
          "attacks, rest = loading the tampered model):")
    print(f"  {'attack':>17} {'config':>28} | {'trial s':>7} | {'attack':>12} {'generate':>12} {'judge':>12} "
          f"{'utility':>12} {'rest':>12} | harm  refusal")
    for name, m in shares.items():
        parts = {k: m[f"{k}_s"] for k in ("attack", "generate", "judge", "utility")}
        parts["rest"] = m["trial_s"] - sum(parts.values())
        cells = " ".join(f"{v:5.1f}s {100 * v / m['trial_s']:4.0f}%" for v in parts.values())
        print(f"  {name:>17} {m['detail']:>28} | {m['trial_s']:7.1f} | {cells} | {m['harm']:.3f} {m['refusal_rate']:6.2f}")
    full, lora = steps["per_step"]["full"], steps["per_step"]["lora"]
    print(f"fine-tuning per step (tasks.finetune.finetune, LocalTrainContext, harmful attack set, batch 16, "
          f"{args.compare_steps} steps, fastest of {args.repeats}, 1 thread; the loop only):")
    for method, per in (("full", full), ("lora", lora)):
        i = steps["info"][method]
        print(f"  method={method:4}: {1000 * per:7.1f} ms/step  ({i['trainable']:,} trainable parameters; whole call "
              f"{i['train_s']:.1f} s, final loss {i['loss']:.3f})")
    print(f"  LoRA vs full: x{full / lora:.2f} steps/s (LoRA {'faster' if lora < full else 'slower'})")
    print(f"total wall time {time.perf_counter() - total_started:.0f} s (1-min load average {os.getloadavg()[0]:.2f} "
          f"at the end)")


if __name__ == "__main__":
    main()
