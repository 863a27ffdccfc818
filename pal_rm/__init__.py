# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""pal-rm: personalized (pluralistic) reward models with PAL, native to transformers and TRL."""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_pal import PalConfig
from .modeling_pal import PalPreTrainedModel, PalRewardModel, PalRewardModelOutput, PalUserConfidence
from .rewards import PalRewardFunction

__version__ = "0.1.0"

AutoConfig.register(PalConfig.model_type, PalConfig, exist_ok=True)
AutoModel.register(PalConfig, PalRewardModel, exist_ok=True)
AutoModelForSequenceClassification.register(PalConfig, PalRewardModel, exist_ok=True)

__all__ = [
    "PalConfig",
    "PalPreTrainedModel",
    "PalRewardFunction",
    "PalRewardModel",
    "PalRewardModelOutput",
    "PalUserConfidence",
]
