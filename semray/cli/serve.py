"""``semray serve [--config serve.yaml] [--host H] [--port P]``: the interactive denoising app on Ray Serve.

Starts (or joins, with ``RAY_ADDRESS``) a Ray instance, deploys the app and blocks until Ctrl-C, then
shuts Serve down. ``--print-config`` validates and prints the effective config without starting
anything, which is how a deployment config is checked before it goes live.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from semray.cli.args import add_config_args
from semray.config.base import dump_yaml, load_config
from semray.config.serve import ServeConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the interactive denoising app (Ray Serve + web page)")
    add_config_args(p, "ServeConfig YAML (default: built-in defaults)", "autoscaling.max_replicas=4")
    p.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--models-dir", type=Path, default=None, help="folder of model directories to offer")
    p.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    p.set_defaults(handler=run)


def effective_config(args: argparse.Namespace) -> ServeConfig:
    """The config file (or defaults) with ``--set`` overrides, then the explicit flags on top."""
    overrides = list(args.overrides)
    if args.host is not None:
        overrides.append(f"host={args.host}")
    if args.port is not None:
        overrides.append(f"port={args.port}")
    if args.models_dir is not None:
        overrides.append(f"models_dir={args.models_dir}")
    return load_config(ServeConfig, args.config, overrides)


def run(args: argparse.Namespace) -> int:
    cfg = effective_config(args)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from ray import serve

    from semray.serve import start

    url = start(cfg)
    print(f"semray app running at {url}  (OpenAPI schema: {url}openapi.json; Ctrl-C to stop)", flush=True)
    # SIGTERM (docker stop, systemd, kill) shuts down as cleanly as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping: shutting down Serve", flush=True)
        serve.shutdown()
    return 0
