"""Human-study simulation (issue #7): bunking/debunking belief-change experiments with simulated
participants. Pure computation: the study spec, the population, the rule backend with planted
effects, rating parsing, and the analysis. The conversation driver and backends live elsewhere."""

from .analysis import AnalysisConfig, analyse, boot_mean, cohen_d_paired, hedges_g, ols
from .config import (
    ATTRIBUTES, STANCES, Arm, Attribute, Backend, Claim, Persuader, Population, RuleParticipant, Scale, Stance,
    StudyConfig, stance_sign,
)
from .population import STREAMS, assign_arms, participant_id, participant_rng, participants, persona_dict, persona_of
from .ratings import elicit, parse_rating, stricter
from .rules import (
    RESULTS_SCHEMA, participant_turn, persuader_turn, planted_effects, reversal_of, rule_answer, rule_corrective,
    rule_ratings, rule_update, simulate_participant, simulate_rule_study,
)

__all__ = [
    "ATTRIBUTES", "RESULTS_SCHEMA", "STANCES", "STREAMS", "AnalysisConfig", "Arm", "Attribute", "Backend", "Claim",
    "Persuader", "Population", "RuleParticipant", "Scale", "Stance", "StudyConfig", "analyse", "assign_arms",
    "boot_mean", "cohen_d_paired", "elicit", "hedges_g", "ols", "parse_rating", "participant_id",
    "participant_rng", "participant_turn", "participants", "persona_dict", "persona_of", "persuader_turn",
    "planted_effects", "reversal_of", "rule_answer", "rule_corrective", "rule_ratings", "rule_update",
    "simulate_participant", "simulate_rule_study", "stance_sign", "stricter",
]
