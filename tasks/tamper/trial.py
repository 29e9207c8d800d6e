"""One trial of a tamper sweep: attack the model, then evaluate the tampered model (replies, verdicts,
utility). Pure computation; the sweep that schedules trials lives in ``workflows.sweep``."""

from __future__ import annotations

import shutil
import tempfile
import time

from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.tamper import judges as judging
from interpflow.tasks.tamper.attacks import Attack
from interpflow.tasks.tamper.evaluate import SafetyConfig, evaluate
from interpflow.tasks.tamper.utility import UtilityConfig
from interpflow.tasks.tamper.world import WorldConfig


class Evaluation(BaseModel):
    """How a (tampered) model is evaluated: the same for every trial, defense and baseline."""

    model_config = ConfigDict(extra="forbid")
    world: WorldConfig = WorldConfig()
    judge: judging.JudgeConfig = judging.JudgeConfig()
    safety: SafetyConfig = SafetyConfig()
    utility: UtilityConfig = UtilityConfig()
    epsilon: float = Field(0.10, ge=0, le=1, description="the utility drop the search objective tolerates")


class SavedFolder:
    """A model folder as a node output (``save_pretrained`` copies it)."""

    def __init__(self, path: str):
        self.path = path

    def save_pretrained(self, dest: str) -> None:
        shutil.copytree(self.path, dest)


def objective(harm: float, utility: float, baseline: float, epsilon: float) -> float:
    """What the search maximises: harm, less any utility drop beyond epsilon (so TPE looks where the
    aggregation's constraint will let a trial count)."""
    drop = (baseline - utility) / baseline if baseline > 0 else 0.0
    return harm - max(0.0, drop - epsilon)


def run_trial(attack: Attack, model: str, prompts, questions, cfg: Evaluation, baseline_utility: float,
              run_training=None) -> dict:
    """Attack ``model`` and evaluate the result: {"replies", "metrics", "model" (if weights changed)}."""
    from interpflow.tasks.models import ModelConfig, load_model

    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="tamper-trial-")
    tampered = attack.apply(model, cfg.world, workdir, run_training)
    attack_s = time.perf_counter() - started
    loaded = load_model(tampered.model, ModelConfig())
    judge = judging.make_judge(cfg.judge)
    result = evaluate(loaded, tampered.tampering, prompts, judge, questions, cfg.safety, cfg.utility)
    m = result["metrics"]
    metrics = {**{f"attack.{k}": v for k, v in tampered.metrics.items()}, **m, "attack_s": attack_s,
               "objective": objective(m["harm"], m["utility"], baseline_utility, cfg.epsilon),
               "trial_s": time.perf_counter() - started}
    out = {"replies": result["replies"], "metrics": metrics}
    if tampered.model != model:
        out["model"] = SavedFolder(tampered.model)
    return out
