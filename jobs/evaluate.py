"""Ray job entry point: the evaluation (or the ablation) on the cluster this job is submitted to.

    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/evaluate.yaml
    ray job submit --working-dir . -- python jobs/evaluate.py --ablation configs/ablation.yaml

Same options as ``semray evaluate``; ``--ray`` is implied, so classical methods and metrics run as Ray
tasks across the cluster. MLflow goes wherever ``MLFLOW_TRACKING_URI`` (or semray's local store) points.
"""

from __future__ import annotations

import sys

from semray.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(["evaluate", *argv, *([] if "--ray" in argv else ["--ray"])]))
