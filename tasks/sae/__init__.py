"""Sparse autoencoders: one base, small variants, synthetic ground truth, dictionary metrics, a plain
training loop. Pure computation (no Ray): the training and evaluation nodes wrap these.

    from interpflow.tasks.sae import SAEConfig, SAETrainConfig, train_sae, make_synthetic
    x, true_dict, _ = make_synthetic(SyntheticConfig())
    model, history = train_sae(SAETrainConfig(sae=SAEConfig(variant="topk", d_in=32, n_latents=64, k=3)), x)
    matched_cosine(model.dictionary(), true_dict)

Universal SAE (one shared code across several models' paired activations): ``universal.py``.
"""

from .archetypal import ArchetypalSAE, RelaxedArchetypalSAE, fit_candidates
from .base import VARIANTS, SAEConfig, SparseAutoencoder, Variant, check_input, make_sae, register
from .metrics import matched_cosine, pairwise_stability, recovery_report
from .synthetic import SyntheticConfig, as_activations, make_synthetic, synthetic_activations
from .train import DivergedError, SAETrainConfig, SAETrainer, lr_at, train_sae
from .universal import (
    UniversalSAE, UniversalSAEConfig, UniversalTrainConfig, check_paired, co_firing, cross_r2, train_universal,
)
from .variants import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE

__all__ = [
    "ArchetypalSAE", "BatchTopKSAE", "DivergedError", "JumpReLUSAE", "RelaxedArchetypalSAE", "ReLUSAE",
    "SAEConfig", "SAETrainConfig", "SAETrainer", "SparseAutoencoder", "SyntheticConfig", "TopKSAE",
    "UniversalSAE", "UniversalSAEConfig", "UniversalTrainConfig", "VARIANTS", "Variant", "as_activations", "check_input",
    "check_paired", "co_firing", "cross_r2", "fit_candidates", "lr_at", "make_sae", "make_synthetic",
    "matched_cosine", "pairwise_stability", "recovery_report", "register", "synthetic_activations", "train_sae", "train_universal",
]
