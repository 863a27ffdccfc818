# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Personalized preference datasets. Every loader returns a `datasets.DatasetDict` with the splits `train`,
`validation`, `test` (seen users), `unseen_train` (few-shot comparisons of new users) and `unseen_test` (held-out
comparisons of the same new users)."""

from ._common import SPLIT_NAMES
from .color_filter import COLOR_FILTER_GROUPS, apply_color_filter, load_color_filter_preferences
from .demo import (
    DEMO_GROUP_PREFERENCES,
    DEMO_PROPERTIES,
    demo_response_pool,
    demo_utility_weights,
    load_demo_preferences,
)
from .persona import DEFAULT_PERSONAS, available_personas, load_persona_preferences
from .personalllm import PERSONALLLM_REWARD_MODELS, load_personalllm_preferences
from .pick_a_filter import PICK_A_FILTER_GROUPS, PICKAPIC_V1_SOURCE, load_pick_a_filter_preferences
from .prism import load_prism_preferences
from .summary import SUMMARY_GROUPS, load_summary_lore_preferences, load_summary_preferences
from .synthetic import bayes_optimal_accuracy, load_synthetic_preferences

__all__ = [
    "COLOR_FILTER_GROUPS",
    "DEFAULT_PERSONAS",
    "DEMO_GROUP_PREFERENCES",
    "DEMO_PROPERTIES",
    "PERSONALLLM_REWARD_MODELS",
    "PICKAPIC_V1_SOURCE",
    "PICK_A_FILTER_GROUPS",
    "SPLIT_NAMES",
    "SUMMARY_GROUPS",
    "apply_color_filter",
    "available_personas",
    "bayes_optimal_accuracy",
    "demo_response_pool",
    "demo_utility_weights",
    "load_color_filter_preferences",
    "load_demo_preferences",
    "load_persona_preferences",
    "load_personalllm_preferences",
    "load_pick_a_filter_preferences",
    "load_prism_preferences",
    "load_summary_lore_preferences",
    "load_summary_preferences",
    "load_synthetic_preferences",
]
