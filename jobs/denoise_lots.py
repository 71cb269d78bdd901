"""Batch-denoise production wafer lots on a Ray cluster (entry point for ``ray job submit``).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/denoise_lots.py /mnt/lots/2024-W18 /mnt/denoised/2024-W18 \
        --model models:/sem-unet@production --cpus-per-actor 4 --actors 32

Same arguments as ``semray denoise`` (``--help`` lists them). Inside a submitted job ``ray.init()``
attaches to the cluster; run locally it starts a local Ray. Set ``MLFLOW_TRACKING_URI`` to a tracking
server every node can reach. INPUT and OUTPUT must be visible to every node (shared file system).
The process exits 0 when every file is ok or skipped, 1 when some failed (the manifest says which).
"""

from __future__ import annotations

import sys

from semray.cli import main

if __name__ == "__main__":
    sys.exit(main(["denoise", *sys.argv[1:]]))
