"""The ``pingtree-relay`` command: serve, deliver, demo, sandbox, check-config, snippet, outbox, sign."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config, parse_config, store_location
from .listening import bind_listener, bound_port, write_port_file

# --help shows this as it is: plain text, no reST markup.
DESCRIPTION = "pingtree-relay: a durable relay and browser SDK for Pingtree's Event Postback API."


def _load(path: str, *, text: str | None = None) -> Config:
    try:
        return load_config(path, text=text)
    except ConfigError as exc:
        sys.exit(f"{path}: {exc}")
    except OSError as exc:
        sys.exit(f"{path}: {exc.strerror or exc}")


def cmd_serve(args: argparse.Namespace) -> int:
    # From here on every line this process tree writes is JSON (server/jsonlog.py), the refusals too.
    from . import jsonlog

    jsonlog.configure()
    log = logging.getLogger("pingtree_relay")
    try:
        config = load_config(args.config)
    except (ConfigError, OSError) as exc:
        log.error("%s: %s", args.config, exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
        return 1
    problem = _store_problem(config)
    if problem:
        log.error("%s: %s", args.config, problem)
        return 1
    from . import wsgi
    from .reload import LastGoodConfig

    workers = args.workers or wsgi.default_workers()
    deliverers = args.delivery_processes or wsgi.default_delivery_processes()
    settings = config.relay
    inline = settings.inline_concurrency if settings.inline_concurrency and settings.inline_timeout else 0
    if inline * 2 > args.threads:
        # Inline attempts wait on Pingtree (up to inline_timeout each) on the worker's request
        # threads: with them all waiting, the requests of the same moment that wanted a thread run
        # on the loop instead (answered 202), so the page that could have had its conversion_id
        # loses it to the ones already waiting. Half the threads stay free for them.
        log.error(
            "%s: relay.inline_concurrency: at most half of --threads (%s inline of %s threads); "
            "lower it or raise --threads",
            args.config,
            inline,
            args.threads,
        )
        return 1
    if workers * inline >= settings.max_in_flight:
        # Every worker's inline attempts come out of the box's one in-flight budget.
        log.error(
            "%s: relay.max_in_flight: must be more than workers x inline_concurrency (%s x %s); raise it "
            "or lower inline_concurrency",
            args.config,
            workers,
            inline,
        )
        return 1
    # Workers and the delivery process build from the config the master validated, never from the
    # file as it is now: an invalid edit followed by SIGHUP or a respawn keeps the last good one.
    last_good = LastGoodConfig(args.config, config)
    deliver = [
        sys.executable,
        "-m",
        "server.cli",
        "deliver",
        "--config",
        args.config,
        "--inline-workers",
        str(workers),
        "--share",
        str(deliverers),
        "--parent-pid",
        str(os.getpid()),
        "--nice",
        str(args.delivery_nice),
    ]
    listener = _listen(args)
    if listener is None:
        return 1
    log.info(
        "pingtree-relay %s serving on http://%s:%s (upstream %s; store: %s)",
        _version(),
        args.host,
        bound_port(listener),
        settings.upstream_url,
        store_location(settings.store),
    )
    _warn(config)
    wsgi.run(
        lambda: worker_app(last_good.config),
        listener=listener,
        workers=workers,
        threads=args.threads,
        multiprocess_metrics=True,
        sidecar=deliver,
        sidecars=deliverers,
        sidecar_env=last_good.environment,
        on_reload=last_good.reload,
        logger_class=jsonlog.GunicornLogger,
    )
    return 0


def _listen(args: argparse.Namespace) -> socket.socket | None:
    """Bind ``--host``/``--port`` now (``--port 0``: the kernel picks) and write ``--port-file``.

    The socket bound here is the one that serves (gunicorn takes it as ``fd://``), so whoever
    started the process learns a port nobody else can have taken meanwhile.
    """
    try:
        listener = bind_listener(args.host, args.port)
    except OSError as exc:
        logging.getLogger("pingtree_relay").error(
            "cannot listen on %s:%s: %s", args.host, args.port, exc.strerror or exc
        )
        return None
    if args.port_file:
        write_port_file(args.port_file, bound_port(listener))
    return listener


def _version() -> str:
    from .build import version

    return version()


def _store_problem(config: Config) -> str | None:
    """Open the store once in the master: migrations run now, and a store written by a newer release
    stops ``serve`` with a sentence, not with workers failing to boot one after another."""
    from .outbox import open_store
    from .outbox.schema import StoreTooNew

    try:
        open_store(config.relay.store).close()
    except StoreTooNew as exc:
        return str(exc)
    return None


def worker_app(config: Config) -> Any:
    """The app each ``serve`` worker builds: no delivery of its own (the delivery processes do it),
    and inline attempts only while the worker has CPU to spare (:mod:`server.cpu_load`)."""
    from . import create_app
    from .cpu_load import CpuLoad

    return create_app(config, start_delivery=False, cpu_load=CpuLoad())


def cmd_deliver(args: argparse.Namespace) -> int:
    """The box's delivery engine, in the foreground, until SIGTERM (then it finishes or hands back
    every lease). ``serve`` runs and supervises it; run it yourself beside another WSGI server."""
    from . import create_app, jsonlog
    from .heap import freeze_what_is_loaded

    # Below the workers: when the box is short of CPU, accepting (what a page waits for, and what
    # makes an event durable) goes first, and delivery catches up once the burst is over. First of
    # all: Linux sets a priority per thread, and the threads started below inherit it.
    priority = lower_priority(args.nice)
    if args.parent_pid:  # started by serve: its lines are JSON like the rest of the box's
        jsonlog.configure()
    from .reload import CONFIG_TEXT_ENV

    # Under serve: the config its master validated (the file may have been edited since, even badly).
    config = _load(args.config, text=os.environ.pop(CONFIG_TEXT_ENV, None) if args.parent_pid else None)
    relay = create_app(config, start_delivery=False).extensions["relay"]  # observers as in a worker
    cap = relay.delivery_cap(args.inline_workers, engines=args.share)  # one of serve's --share processes
    if args.parent_pid:
        _stop_when_orphaned(relay.dispatcher, args.parent_pid)
    freeze_what_is_loaded()
    # Under serve, stdout is jsonlog's: this line comes out as JSON too.
    print(
        f"pingtree-relay delivering to {config.relay.upstream_url}, up to {cap} in flight, "
        f"CPU priority {priority}",
        flush=True,
    )
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
    from .sandbox import loop_server

    def ready(port: int) -> None:
        print(f"Pingtree sandbox on http://{args.host}:{port}", flush=True)
        if args.port_file:
            write_port_file(args.port_file, port)

    # One process on an event loop: the state (events, locks, faults) is in memory, and a delay
    # fault is a timer, not a thread, so a slow sandbox holds thousands of answers at once.
    loop_server.run(config, host=args.host, port=args.port, ready=ready)
    return 0


def demo_config(port: int, store_dir: str | None = None) -> Config:
    """The bundled demo campaign, pointed at this port (the sandbox is mounted at /sandbox)."""
    import tomllib

    data: dict[str, Any] = tomllib.loads((Path(__file__).parent / "demo.toml").read_text())
    data["relay"]["upstream_url"] = f"http://127.0.0.1:{port}/sandbox"
    store_dir = store_dir or tempfile.gettempdir()
    data["relay"]["store"] = f"sqlite:///{Path(store_dir) / f'pingtree-relay-demo-{port}.sqlite3'}"
    data["relay"].setdefault("admin_token", "demo-admin-token")
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

    listener = _listen(args)
    if listener is None:
        return 1
    port = bound_port(listener)  # the demo's config names its own port: bound first, then built
    config = demo_config(port)
    base = f"http://127.0.0.1:{port}"
    print(
        "pingtree-relay demo\n"
        f"  demo funnel:     {base}/demo/?utm_source=google&utm_campaign=spring&sub1=ad42&pid=src_demo\n"
        f"  relay endpoint:  {base}/api/event/cmp_demo\n"
        f"  SDK:             {base}/sdk/cmp_demo.js\n"
        f'  call postback:   {base}/postback/cmp_demo/ringba  (the thank-you page\'s "Simulate a completed call")\n'
        f"  sandbox (fake Pingtree, what it received): {base}/sandbox/\n"
        f"  dashboard:       {base}/admin/  (token: {config.relay.admin_token})\n"
        "Press Ctrl+C to stop.",
        flush=True,
    )
    wsgi.run(lambda: demo_app(config), listener=listener, workers=1, threads=32)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.file or args.config_option
    if not path or (args.file and args.config_option and args.file != args.config_option):
        print("give one config file: check-config FILE (or --config FILE)", file=sys.stderr)
        return 2
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    events = sum(len(c.events) for c in config.campaigns.values())
    print(f"{path}: OK ({len(config.campaigns)} campaigns, {events} events)")
    print(f"store: {store_location(config.relay.store)}")
    _warn(config)
    return 0


def _warn(config: Config) -> None:
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def cmd_snippet(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if args.cid not in config.campaigns:
        print(f"no campaign {args.cid!r} in {args.config}", file=sys.stderr)
        return 1
    from .sdk import csp_sources, pin, snippet_tag

    base = args.base_url or config.relay.public_url
    if not base:
        print("give --base-url (where the relay is reachable) or set relay.public_url", file=sys.stderr)
        return 1
    if args.csp:
        # The sources a strict Content-Security-Policy needs for this tag, one directive a line.
        sources = csp_sources(config, args.cid, base)
        if args.no_stub:
            sources["script-src"] = [s for s in sources["script-src"] if not s.startswith("'sha256-")]
        for directive, values in sources.items():
            print(f"{directive} {' '.join(values)}")
        return 0
    if args.integrity:
        pin(config, args.cid)  # the relay can serve this build even if its config changes first
    print(snippet_tag(config, args.cid, base, integrity=args.integrity, stub=not args.no_stub))
    return 0


def _open_store(args: argparse.Namespace) -> Any:
    from .outbox import open_store

    return open_store(_load(args.config).relay.store)


def cmd_outbox_stats(args: argparse.Namespace) -> int:
    store = _open_store(args)
    print(json.dumps(store.stats().to_dict(), indent=2))
    store.close()
    return 0


def cmd_outbox_list(args: argparse.Namespace) -> int:
    store = _open_store(args)
    for record in store.find(state=args.state, cid=args.cid, limit=args.limit):
        # The zone is printed: an operator comparing with Pingtree's or nginx's times must not guess.
        when = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(record.received_at))
        reason = f"  {record.last_error}" if record.last_error and record.state != "delivered" else ""
        print(
            f"{record.id}  {when}  {record.cid}  {record.event_id}  {record.display_state()}"
            f"  attempts={record.attempts}{reason}"
        )
    store.close()
    return 0


def cmd_outbox_retry(args: argparse.Namespace) -> int:
    if not (args.ids or args.cid or args.all):
        print("say which dead letters: IDs, --cid CID or --all", file=sys.stderr)
        return 1
    store = _open_store(args)
    count = store.requeue(ids=args.ids, cid=args.cid, everything=args.all)
    store.close()
    print(f"re-queued {count} dead letters")
    return 0


def cmd_outbox_purge(args: argparse.Namespace) -> int:
    if args.state == "pending":  # undelivered events are never deleted by an operator's typo
        print("only delivered or dead events can be purged", file=sys.stderr)
        return 1
    state = args.state or "delivered"
    older_than = (
        args.older_than
        if args.older_than is not None
        else (args.older_than_hours * 3600 if args.older_than_hours is not None else None)
    )
    if older_than is None and not args.all:
        # Deleting is not undone: an age, or --all spelled out, is the operator's decision.
        print(
            f"purge deletes {state} events from the outbox; say which: --older-than 7d (last updated "
            f"more than 7 days ago; also h, m, s) or --all (every {state} event). Nothing was deleted.",
            file=sys.stderr,
        )
        return 2
    store = _open_store(args)
    count = store.purge(state=state, older_than=older_than or 0.0)
    store.close()
    scope = f"last updated more than {_human(older_than)} ago" if older_than else "all of them"
    print(f"purged {count} {state} events ({scope})")
    return 0


def cmd_outbox_backup(args: argparse.Namespace) -> int:
    from .outbox.backup import BackupError, backup

    try:
        pages = backup(_load(args.config).relay.store, args.destination)
    except BackupError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"backed up the outbox to {args.destination} ({pages} pages)")
    return 0


def cmd_outbox_move(args: argparse.Namespace) -> int:
    from .migrate import StoreInUse, move_events
    from .outbox import open_store

    target_url = _load(args.config).relay.store
    if args.source == target_url:
        print(f"--from is the store {args.config} already uses; give the old store's URL", file=sys.stderr)
        return 1
    source, target = open_store(args.source), open_store(target_url)
    try:
        report = move_events(source, target, include_history=args.history)
    except StoreInUse as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        source.close()
        target.close()
    print(report.summary())
    return 0


def _duration(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` -> seconds (argparse type: its error names the option)."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    number, unit = text[:-1], text[-1:].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value < 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 7d, 12h, 30m or 90s, not {text!r}")
    return value * units[unit]


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


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
    parser = argparse.ArgumentParser(prog="pingtree-relay", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"pingtree-relay {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve",
        help="run the relay under gunicorn",
        description="Run the relay under "
        "gunicorn (event-loop workers). SIGTERM drains gracefully, SIGHUP reloads.",
    )
    _config_option(p)
    _listen_options(p, 8000)
    p.add_argument(
        "--workers", type=_positive, default=None, help="worker processes (default: 1 per CPU core, 2 to 8)"
    )
    p.add_argument(
        "--threads",
        type=_positive,
        default=8,
        help="request threads per worker, for requests that may wait on Pingtree (default: 8)",
    )
    p.add_argument(
        "--delivery-processes",
        type=_positive,
        default=None,
        help="delivery processes, sharing relay.max_in_flight (default: 1 per CPU core, 1 to 4)",
    )
    p.add_argument(
        "--delivery-nice",
        type=_niceness,
        default=DELIVERY_NICE,
        metavar="N",
        help="the delivery processes' CPU priority below the workers': a niceness to add, 0 to 19, or "
        f"idle, CPU no one else wants (default: {DELIVERY_NICE}): when the box is short of CPU, "
        "accepting events goes first",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("deliver", help="run the delivery engine (serve starts one itself)")
    _config_option(p)
    p.add_argument(
        "--inline-workers",
        type=int,
        default=0,
        help="processes making inline attempts: their inline_concurrency comes out of max_in_flight",
    )
    p.add_argument(
        "--share",
        type=_positive,
        default=1,
        metavar="N",
        help="one of N delivery processes of one box: take 1/N of max_in_flight (default: 1)",
    )
    p.add_argument(
        "--nice",
        type=_niceness,
        default=0,
        metavar="N",
        help="run at this much lower CPU priority, 0 to 19, or idle (default: 0; serve gives its own "
        "--delivery-nice)",
    )
    p.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_deliver)

    p = sub.add_parser("demo", help="relay + sandbox + demo pages, no config needed")
    _listen_options(p, 8000)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sandbox", help="run the Pingtree sandbox alone")
    _config_option(p)
    _listen_options(p, 9000)
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser(
        "check-config",
        help="validate a config file",
        description="Exit 0 when the file is valid, else 1 naming the key to fix.",
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="the relay's TOML config (or give --config)")
    p.add_argument("--config", dest="config_option", metavar="FILE", help="the same, as an option")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "snippet", help="print a campaign's embed tag (stable URL; --integrity pins today's build)"
    )
    p.add_argument("cid", metavar="CID", help="the campaign id, as in [campaigns.CID]")
    _config_option(p)
    p.add_argument(
        "--base-url",
        default="",
        metavar="URL",
        help="where browsers reach the relay (default: relay.public_url)",
    )
    p.add_argument(
        "--integrity",
        action="store_true",
        help="pin today's build with SRI; servable 30 days after a config change or upgrade "
        "supersedes it, then the tag stops working (see docs/js-api.md)",
    )
    p.add_argument(
        "--csp",
        action="store_true",
        help="print the Content-Security-Policy sources the tag needs instead of the tag",
    )
    p.add_argument(
        "--no-stub",
        action="store_true",
        help="the script tag alone, no inline stub (pingtree() calls wait for the script's load)",
    )
    p.set_defaults(func=cmd_snippet)

    _outbox_parser(sub)

    p = sub.add_parser("sign", help="sign a conversion's revenue (HMAC-SHA256)")
    p.add_argument("--cid", required=True, help="the campaign id")
    p.add_argument("--transaction-id", required=True, help="the lead's transaction_id")
    p.add_argument("--event-id", required=True, help="the conversion event's id")
    p.add_argument("--amount", required=True, help="the revenue, e.g. 45.00")
    p.add_argument("--secret", default="", help="the campaign's secret (default: read from --config)")
    p.add_argument("--config", default="", metavar="FILE", help="the relay's TOML config, for the secret")
    p.set_defaults(func=cmd_sign)
    return parser


def _outbox_parser(sub: Any) -> None:
    outbox = sub.add_parser(
        "outbox",
        help="inspect and operate the outbox",
        description="Inspect and operate the outbox (the durable queue of events).",
    )
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = actions.add_parser("stats", help="counts by state and the oldest pending age, as JSON")
    _config_option(p)
    p.set_defaults(func=cmd_outbox_stats)

    p = actions.add_parser("list", help="the latest events, newest first")
    _config_option(p)
    p.add_argument("--state", choices=("pending", "delivered", "dead"), help="only events in this state")
    p.add_argument("--cid", help="only this campaign's events")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default: 50)")
    p.set_defaults(func=cmd_outbox_list)

    p = actions.add_parser("retry", help="re-queue dead letters")
    p.add_argument("ids", nargs="*", metavar="ID", help="dead letters to re-queue, by event_uuid")
    _config_option(p)
    p.add_argument("--cid", help="every dead letter of this campaign")
    p.add_argument("--all", action="store_true", help="every dead letter")
    p.set_defaults(func=cmd_outbox_retry)

    p = actions.add_parser(
        "purge",
        help="delete delivered (or dead) events",
        description="Delete delivered events (or dead letters with --state dead). "
        "Pending events are never deleted. Give --older-than or --all.",
    )
    _config_option(p)
    p.add_argument(
        "--state", choices=("delivered", "dead", "pending"), help="which events: delivered (default) or dead"
    )
    p.add_argument(
        "--older-than",
        type=_duration,
        metavar="AGE",
        help="only events last updated more than AGE ago: 7d, 12h, 30m, 90s",
    )
    p.add_argument("--older-than-hours", type=float, metavar="H", help="the same in hours (e.g. 168)")
    p.add_argument("--all", action="store_true", help="every event in that state, whatever its age")
    p.set_defaults(func=cmd_outbox_purge)

    p = actions.add_parser(
        "backup",
        help="copy the SQLite outbox to a file while the relay runs",
        description="A consistent copy of the SQLite outbox (SQLite's online backup), "
        "safe while the relay is running.",
    )
    p.add_argument("destination", metavar="DEST", help="the backup file to write (must not exist)")
    _config_option(p)
    p.set_defaults(func=cmd_outbox_backup)

    p = actions.add_parser(
        "move",
        help="move events from an old store into the configured one",
        description="Move events from another store (e.g. the SQLite file a box used "
        "before switching to Redis) into the store --config names. Pending events "
        "are moved and deleted from the old store; run it after the relay was "
        "restarted on the new store. Safe to run twice.",
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="URL",
        help="the old store, e.g. sqlite:////var/lib/pingtree-relay/outbox.sqlite3",
    )
    _config_option(p)
    p.add_argument(
        "--history",
        action="store_true",
        help="also copy delivered and dead events (replays and the dashboard keep them)",
    )
    p.set_defaults(func=cmd_outbox_move)


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1, or argparse's own error naming the option."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


# serve's delivery processes run below its workers (``--delivery-nice``): "idle", Linux's SCHED_IDLE
# class, which gets a core only when no other process wants it and gives it up at once when a
# worker wakes (a niceness let one that had the core keep it a few ms more). Why, and the A/Bs:
# docs/durability.md, "The delivery engine".
IDLE = "idle"
DELIVERY_NICE = IDLE


def _niceness(text: str) -> int | str:
    """An argparse type: a niceness to add, 0 (none) to 19 (the least priority there is), or "idle"."""
    if text == IDLE:
        return IDLE
    if not (text.isdigit() and int(text) <= 19):  # isdigit: no sign, so never below 0
        raise argparse.ArgumentTypeError(f"expected 0 to 19 or idle, not {text!r}")
    return int(text)


def lower_priority(nice: int | str) -> str:
    """Lower this thread's CPU priority (and so that of the threads it starts from now on) by
    ``nice`` (0: not at all), or to SCHED_IDLE for "idle" (a niceness of 19 where the class is
    missing or refused); what it got, in words, for the delivery process's first line."""
    if nice != IDLE:
        return f"niceness {os.nice(int(nice))}"
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # not Linux, or a sandbox that forbids it
        return f"niceness {os.nice(19)} (SCHED_IDLE refused: {exc})"
    return "idle (SCHED_IDLE)"


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="the relay's TOML config file")


def _listen_options(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=port, help=f"port to listen on (default: {port}; 0: the kernel picks one)"
    )
    p.add_argument(
        "--port-file",
        metavar="PATH",
        help="once listening, write the port to PATH (atomically: the file appears whole); with "
        "--port 0 this is how whoever started the server learns its port",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
