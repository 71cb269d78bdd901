"""Ray job entry point for adaptation: the same arguments as ``semray adapt``.

    ray job submit --working-dir . -- python jobs/adapt.py /data/tool7/noisy --out outputs/adapt-tool7

On a multi-node cluster the input and output folders must be readable/writable by the driver, set
``train.run.storage_path`` is not needed (checkpoints stay under OUT/work), and ``MLFLOW_TRACKING_URI``
should point at a tracking server every node can reach (see semray.tracking).
"""

from __future__ import annotations

import sys

from semray.cli import main

if __name__ == "__main__":
    sys.exit(main(["adapt", *sys.argv[1:]]))
