# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Training for PAL reward models, installed as `pal_rm.trainers`."""

from .model_selection import NumPrototypesChoice, choose_num_prototypes
from .pal_reward_config import PalRewardConfig
from .pal_reward_trainer import DataCollatorForPersonalizedPreference, FeatureStore, PalRewardTrainer
from .sparse_user_table import SparseUserTableAdam

__all__ = [
    "DataCollatorForPersonalizedPreference",
    "FeatureStore",
    "NumPrototypesChoice",
    "PalRewardConfig",
    "PalRewardTrainer",
    "SparseUserTableAdam",
    "choose_num_prototypes",
]
