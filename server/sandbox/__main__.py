"""``python -m server.sandbox --config FILE --port PORT``: serve the sandbox alone under gunicorn.

One worker on purpose: the sandbox's state is in memory, and two processes would keep two
different sets of locks and fired events. Threads give the concurrency instead.
"""

from __future__ import annotations

import argparse
import sys

from flask import Flask

from server import wsgi
from server.config import ConfigError, load_config
from server.sandbox.app import create_sandbox_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.sandbox", description=__doc__)
    parser.add_argument("--config", required=True, help="the TOML file whose campaigns the sandbox serves")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--lock-seconds", type=float, default=2.0, help="Pingtree's lock window")
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        # Loaded before gunicorn starts, so a bad file fails here with the key named, not in a worker.
        config = load_config(args.config)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def factory() -> Flask:
        return create_sandbox_app(config, lock_seconds=args.lock_seconds)

    wsgi.run(factory, host=args.host, port=args.port, workers=1, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
