"""Ray job entry point for the loss/architecture search: the same arguments as ``semray tune``.

    ray start --head                                   # or `ray up cluster.yaml`
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune_losses.py --config configs/tune_laptop.yaml --set search.num_samples=4

Inside a job the driver joins the cluster (``ray.init(address="auto")``). The config is validated
before any Ray work, so a bad value fails the job at once with a message naming the field. Prints the
MLflow experiment id, the parent run id, the best config and the registered model version. On a
multi-node cluster set ``run.storage_path`` and the shards to shared storage and ``MLFLOW_TRACKING_URI``
to a tracking server every node can reach (see configs/tune_cluster.yaml).
"""

from __future__ import annotations

import sys

from semray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
