"""``python -m server.sandbox --config FILE --port PORT``: serve the sandbox alone.

One process on one event loop (:mod:`server.sandbox.loop_server`): the sandbox's state is in
memory, and two processes would keep two different sets of locks and fired events; a delay fault
is a timer there, so one process holds thousands of slow answers at once.
"""

from __future__ import annotations

import argparse
import sys

from server.config import ConfigError, load_config
from server.listening import write_port_file
from server.sandbox import loop_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.sandbox", description=__doc__)
    parser.add_argument("--config", required=True, help="the TOML file whose campaigns the sandbox serves")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0: the kernel picks a free port")
    parser.add_argument("--port-file", help="once listening, write the port to this file (atomically)")
    parser.add_argument("--lock-seconds", type=float, default=2.0, help="Pingtree's lock window")
    args = parser.parse_args(argv)
    try:
        # Loaded before serving, so a bad file fails here with the key named.
        config = load_config(args.config)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def ready(port: int) -> None:
        if args.port_file:
            write_port_file(args.port_file, port)

    loop_server.run(config, host=args.host, port=args.port, lock_seconds=args.lock_seconds, ready=ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
