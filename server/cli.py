"""The ``pingtree-relay`` command: serve, deliver, demo, sandbox, check-config, snippet, outbox, sign."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config, parse_config


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        sys.exit(f"{path}: {exc}")
    except OSError as exc:
        sys.exit(f"{path}: {exc.strerror or exc}")


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    from . import create_app, wsgi

    workers = args.workers or wsgi.default_workers()
    settings = config.relay
    inline = settings.inline_concurrency if settings.inline_concurrency and settings.inline_timeout else 0
    if workers * inline >= settings.max_in_flight:
        # Every worker's inline attempts come out of the box's one in-flight budget.
        sys.exit(f"{args.config}: relay.max_in_flight: must be more than workers x inline_concurrency "
                 f"({workers} x {inline}); raise it or lower inline_concurrency")
    deliver = [sys.executable, "-m", "server.cli", "deliver", "--config", args.config,
               "--inline-workers", str(workers), "--parent-pid", str(os.getpid())]
    print(f"pingtree-relay serving on http://{args.host}:{args.port} (upstream {settings.upstream_url})",
          flush=True)
    wsgi.run(lambda: create_app(load_config(args.config), start_delivery=False), host=args.host, port=args.port,
             workers=workers, threads=args.threads, multiprocess_metrics=True, sidecar=deliver)
    return 0


def cmd_deliver(args: argparse.Namespace) -> int:
    """The box's delivery engine, in the foreground, until SIGTERM (then it finishes or hands back
    every lease). ``serve`` runs and supervises it; run it yourself beside another WSGI server."""
    config = _load(args.config)
    from . import create_app

    relay = create_app(config, start_delivery=False).extensions["relay"]  # observers as in a worker
    cap = relay.delivery_cap(args.inline_workers)
    if args.parent_pid:
        _stop_when_orphaned(relay.dispatcher, args.parent_pid)
    print(f"pingtree-relay delivering to {config.relay.upstream_url}, up to {cap} in flight", flush=True)
    relay.dispatcher.run(cap, handle_signals=True)
    relay.close()
    return 0


def _stop_when_orphaned(dispatcher: Any, parent_pid: int) -> None:
    """A delivery process whose ``serve`` master died (SIGKILL) stops cleanly instead of lingering."""
    import threading

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        dispatcher.request_stop()

    threading.Thread(target=watch, name="pt-parent-watch", daemon=True).start()


def cmd_sandbox(args: argparse.Namespace) -> int:
    config = _load(args.config)
    from . import wsgi
    from .sandbox import create_sandbox_app

    print(f"Pingtree sandbox on http://{args.host}:{args.port}", flush=True)
    # One worker: the sandbox keeps its state (received events, locks, faults) in memory.
    wsgi.run(lambda: create_sandbox_app(config), host=args.host, port=args.port, workers=1, threads=64)
    return 0


def demo_config(port: int, store_dir: str | None = None) -> Config:
    """The bundled demo campaign, pointed at this port (the sandbox is mounted at /sandbox)."""
    import tomllib

    data: dict[str, Any] = tomllib.loads((Path(__file__).parent / "demo.toml").read_text())
    data["relay"]["upstream_url"] = f"http://127.0.0.1:{port}/sandbox"
    store_dir = store_dir or tempfile.gettempdir()
    data["relay"]["store"] = f"sqlite:///{Path(store_dir) / f'pingtree-relay-demo-{port}.sqlite3'}"
    data["relay"].setdefault("admin_token", "demo")
    for campaign in data["campaigns"].values():
        campaign["allowed_origins"] = [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]
    return parse_config(data, source="demo")


def demo_app(config: Config) -> Any:
    """Relay at /, sandbox at /sandbox, demo funnel at /demo: one process, one port."""
    from flask import Flask, redirect
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from . import create_app
    from .paths import STATIC
    from .sandbox import create_sandbox_app

    relay = create_app(config)

    pages = Flask("pingtree_relay_demo", static_folder=str(STATIC / "demo"), static_url_path="")

    @pages.get("/")
    def index() -> Any:
        return pages.send_static_file("index.html")

    @relay.get("/")
    def home() -> Any:
        return redirect("/demo/")

    return DispatcherMiddleware(relay.wsgi_app, {"/sandbox": create_sandbox_app(config), "/demo": pages})


def cmd_demo(args: argparse.Namespace) -> int:
    from . import wsgi

    config = demo_config(args.port)
    base = f"http://127.0.0.1:{args.port}"
    print(
        "pingtree-relay demo\n"
        f"  demo funnel:     {base}/demo/?utm_source=google&utm_campaign=spring&sub1=ad42&pid=src_demo\n"
        f"  relay endpoint:  {base}/api/event/cmp_demo\n"
        f"  SDK:             {base}/sdk/cmp_demo.js\n"
        f"  call postback:   {base}/postback/cmp_demo/ringba  (the thank-you page's \"Simulate a completed call\")\n"
        f"  sandbox (fake Pingtree, what it received): {base}/sandbox/\n"
        f"  dashboard:       {base}/admin/  (token: {config.relay.admin_token})\n"
        "Press Ctrl+C to stop.",
        flush=True,
    )
    wsgi.run(lambda: demo_app(config), host=args.host, port=args.port, workers=1, threads=32)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    events = sum(len(c.events) for c in config.campaigns.values())
    print(f"{args.file}: OK ({len(config.campaigns)} campaigns, {events} events)")
    return 0


def cmd_snippet(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if args.cid not in config.campaigns:
        print(f"no campaign {args.cid!r} in {args.config}", file=sys.stderr)
        return 1
    from .sdk import pin, snippet_tag

    base = args.base_url or config.relay.public_url
    if not base:
        print("give --base-url (where the relay is reachable) or set relay.public_url", file=sys.stderr)
        return 1
    if args.integrity:
        pin(config, args.cid)  # the relay can serve this build even if its config changes first
    print(snippet_tag(config, args.cid, base, integrity=args.integrity))
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    config = _load(args.config)
    from .outbox import open_store

    store = open_store(config.relay.store)
    if args.action == "stats":
        print(json.dumps(store.stats().to_dict(), indent=2))
    elif args.action == "list":
        for record in store.list(state=args.state, cid=args.cid, limit=args.limit):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.received_at))
            reason = f"  {record.last_error}" if record.last_error and record.state != "delivered" else ""
            print(f"{record.id}  {when}  {record.cid}  {record.event_id}  {record.display_state()}"
                  f"  attempts={record.attempts}{reason}")
    elif args.action == "retry":
        if not (args.ids or args.cid or args.all):
            print("say which dead letters: IDs, --cid CID or --all", file=sys.stderr)
            return 1
        count = store.requeue(ids=args.ids, cid=args.cid, everything=args.all)
        print(f"re-queued {count} dead letters")
    elif args.action == "purge":
        if args.state == "pending":  # undelivered events are never deleted by an operator's typo
            print("only delivered or dead events can be purged", file=sys.stderr)
            return 1
        count = store.purge(state=args.state or "delivered", older_than=args.older_than_hours * 3600)
        print(f"purged {count} {args.state or 'delivered'} events")
    store.close()
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from .validation import sign_revenue

    secret = args.secret
    if not secret:
        if not args.config:
            print("give --secret or --config", file=sys.stderr)
            return 1
        campaign = _load(args.config).campaigns.get(args.cid)
        if campaign is None or not campaign.secret:
            print(f"campaign {args.cid!r} has no secret", file=sys.stderr)
            return 1
        secret = campaign.secret
    print(sign_revenue(secret, args.cid, args.transaction_id, args.event_id, args.amount))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pingtree-relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the relay under gunicorn")
    p.add_argument("--config", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=None, help="default: 2-4 by CPU count")
    p.add_argument("--threads", type=int, default=8)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("deliver", help="run the delivery engine (serve starts one itself)")
    p.add_argument("--config", required=True)
    p.add_argument("--inline-workers", type=int, default=0,
                   help="processes making inline attempts: their inline_concurrency comes out of max_in_flight")
    p.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_deliver)

    p = sub.add_parser("demo", help="relay + sandbox + demo pages, no config needed")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sandbox", help="run the Pingtree sandbox alone")
    p.add_argument("--config", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("snippet", help="print a campaign's embed tag (stable URL; --integrity pins today's build)")
    p.add_argument("cid")
    p.add_argument("--config", required=True)
    p.add_argument("--base-url", default="")
    p.add_argument("--integrity", action="store_true",
                   help="pin today's build with SRI; servable 30 days after a config change or upgrade "
                        "supersedes it, then the tag stops working (see docs/js-api.md)")
    p.set_defaults(func=cmd_snippet)

    p = sub.add_parser("outbox", help="inspect and operate the outbox")
    p.add_argument("action", choices=("stats", "list", "retry", "purge"))
    p.add_argument("ids", nargs="*", help="retry: dead-letter ids")
    p.add_argument("--config", required=True)
    p.add_argument("--state", choices=("pending", "delivered", "dead"))
    p.add_argument("--cid")
    p.add_argument("--all", action="store_true", help="retry: every dead letter")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--older-than-hours", type=float, default=0.0)
    p.set_defaults(func=cmd_outbox)

    p = sub.add_parser("sign", help="sign a conversion's revenue (HMAC-SHA256)")
    p.add_argument("--cid", required=True)
    p.add_argument("--transaction-id", required=True)
    p.add_argument("--event-id", required=True)
    p.add_argument("--amount", required=True)
    p.add_argument("--secret", default="")
    p.add_argument("--config", default="")
    p.set_defaults(func=cmd_sign)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
