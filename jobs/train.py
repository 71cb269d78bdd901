"""Ray job entry point for training: the same arguments as ``semray train``.

    ray job submit --working-dir . -- python jobs/train.py --config configs/stage3_full.yaml
    # fine-tune a registered model on a mix of real and synthetic shards (docs/real_data.md):
    ray job submit --working-dir . -- python jobs/train.py --config configs/mix_example.yaml --init models:/semray-default@prod

On a multi-node cluster set ``run.storage_path`` to shared storage and ``MLFLOW_TRACKING_URI`` to a
tracking server every node can reach (see semray.tracking).
"""

from __future__ import annotations

import sys

from semray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
