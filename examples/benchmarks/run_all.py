# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Runs every benchmark with its defaults (about an hour on 2 CPU cores), then renders the README's Results section from
their JSON files (`make benchmarks`). The GRPO example's figures are included when `outputs/examples/grpo_with_pal.json`
exists (`python examples/grpo_with_pal.py`, about 15 minutes alone on 2 cores).

```bash
python examples/benchmarks/run_all.py                 # all
python examples/benchmarks/run_all.py synthetic speed # some
```
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ALL = (
    "persona",
    "synthetic",
    "active",
    "downstream",
    "summary",
    "images",
    "big_backbone",
    "checkpoints",
    "multi_process",
    "speed",
)  # the last two alone: they measure wall time


def main(argv=None):
    names = (argv if argv is not None else sys.argv[1:]) or list(ALL)
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        raise SystemExit(f"Unknown benchmark(s) {unknown}; choose from {list(ALL)}.")
    for name in names:
        subprocess.run([sys.executable, os.path.join(HERE, f"{name}.py")], check=True)
    subprocess.run([sys.executable, os.path.join(HERE, "render_results.py"), "--collect"], check=True)


if __name__ == "__main__":
    main()
