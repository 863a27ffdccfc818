# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""pal-rm's evaluation metrics, one implementation for the trainer, the benchmarks and `evaluate.load`.

```python
>>> from pal_rm.metrics import personalized_preference_metrics
>>> personalized_preference_metrics([1.5, -0.2, 0.0], ["alice", "alice", "bob"])["accuracy"]
0.5
>>> import evaluate
>>> metric = evaluate.load(PERSONALIZED_PREFERENCE_METRIC_PATH)  # the same code, as an `evaluate` metric
```
"""

import os

from .personalized_preference import per_user_accuracy, personalized_preference_metrics

PERSONALIZED_PREFERENCE_METRIC_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "personalized_preference"
)

__all__ = ["PERSONALIZED_PREFERENCE_METRIC_PATH", "per_user_accuracy", "personalized_preference_metrics"]
