"""Training-data attribution (issue #6): influence functions and Concept Influence (arXiv 2602.14869).

Pure computation, no Ray; the workflow shards these calls. The flow, for a model, a ``Task`` and batches
(dicts of tensors with an ``id`` column):

    selection = select_parameters(model, ["transformer.h.*.mlp.c_fc.weight"])
    train = per_example_grads(model, CausalLMTask(), batch, selection)                    # per shard
    concept = ConceptTask("blocks.0.resid_post", v)
    query = per_example_grads(model, concept, query_batch, selection, kind="measurement").grads
    pre = fit_on_batches(PreconditionerConfig(strategy="ekfac"), model, CausalLMTask(), batches, selection)
    table = concept_influence(query, train, pre)                                           # (id, score, method)
    auc(table, planted_ids)

Modules: ``params`` (which parameters), ``task`` (the Task seam; causal-LM loss, concept measurement),
``grads`` (vmap per-example gradients), ``projection`` (seeded dense random projection), ``logra``
(LoGra: per-layer low-rank projections built without the full per-example gradient), ``kfac`` and
``precondition`` (identity / diagonal / K-FAC / EK-FAC from shard-summable statistics), ``scores``
(influence, streaming top-k scores, probe and baseline scores, AUC, precision@k), ``exact`` (exact-Hessian reference).
"""

from .exact import (
    LogisticConfig, LogisticProblem, LogisticTask, exact_hessian, exact_influence, leave_one_out, logistic_hessian,
    make_logistic_problem, spearman_table,
)
from .grads import (
    GradConfig, PerExampleGrads, compute_grads, functional_mode, loop_per_example_grads, per_example_grad_dict,
    per_example_grads,
)
from .kfac import (
    CovarianceStats, KronLayer, KroneckerBasis, LambdaStats, covariance_stats, eigendecompose, kronecker_layers,
    lambda_stats,
)
from .logra import LograConfig, LograProjection, fit_projected
from .params import ParamSelection, select_parameters
from .precondition import (
    FITTERS, STAGES, DiagonalPreconditioner, DiagonalStats, IdentityPreconditioner, KroneckerPreconditioner,
    KroneckerStats, Preconditioner, PreconditionerConfig, fit, fit_on_batches, register, sum_stats,
)
from .projection import ProjectionConfig, RandomProjection
from .scores import (
    SCHEMA, StreamingScores, auc, classical_influence, concept_influence, embedding_similarity, influence, mean_pool,
    precision_at_k, probe_scores, random_scores, score_table, token_projection,
)
from .task import CausalLMTask, ConceptTask, Task, site_activation

__all__ = [
    "FITTERS", "SCHEMA", "STAGES", "CausalLMTask", "ConceptTask", "CovarianceStats", "DiagonalPreconditioner",
    "DiagonalStats", "GradConfig", "IdentityPreconditioner", "KronLayer", "KroneckerBasis",
    "KroneckerPreconditioner", "KroneckerStats", "LambdaStats", "LograConfig", "LograProjection", "LogisticConfig", "LogisticProblem",
    "LogisticTask", "ParamSelection", "PerExampleGrads", "Preconditioner", "PreconditionerConfig",
    "ProjectionConfig", "RandomProjection", "StreamingScores", "Task", "auc", "classical_influence", "compute_grads",
    "concept_influence", "covariance_stats", "eigendecompose", "embedding_similarity", "exact_hessian",
    "exact_influence", "fit", "fit_on_batches", "fit_projected", "functional_mode", "influence", "kronecker_layers", "lambda_stats",
    "leave_one_out", "logistic_hessian", "loop_per_example_grads", "make_logistic_problem", "mean_pool",
    "per_example_grad_dict", "per_example_grads", "precision_at_k", "probe_scores", "random_scores", "register",
    "score_table", "select_parameters", "site_activation", "spearman_table", "sum_stats", "token_projection",
]
