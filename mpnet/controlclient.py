"""The command-line side of the control socket: ``mpnet status | reload | stop | workers N``
send one JSON request to a running master (:mod:`mpnet.control`) and show its answer."""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .control import default_socket_path
from .pure.controlproto import (
    ControlProtocolError,
    ControlReply,
    ControlRequest,
    ReloadRequest,
    StatusRequest,
    StopRequest,
    WorkersRequest,
    parse_reply,
    request_to_json,
)


class ControlError(Exception):
    """The master could not be reached or refused the request."""


def request(path: Path, command: ControlRequest, timeout: float = 30.0) -> ControlReply:
    """Send *command* to the master listening on *path*; its reply, or :class:`ControlError`
    (unreachable, refused, timed out, or an answer that is not a valid reply)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}: is mpnet running?") from None
        except ConnectionRefusedError:
            raise ControlError(f"nothing listens on {path}: is mpnet running?") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}") from None
        # A refused peer is answered and closed at once, maybe before its request is even
        # sent (EPIPE) and with the request unread (the answer, then ECONNRESET): read the
        # answer whatever happens to the request.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request_to_json(command))
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise ControlError(f"no answer from {path} within {timeout:g}s") from None
    finally:
        sock.close()
    if not data:
        raise ControlError(f"the master at {path} closed the connection without an answer")
    try:
        reply = parse_reply(data)
    except ControlProtocolError as exc:
        raise ControlError(f"malformed answer from the master at {path}: {exc}") from None
    if not reply.ok:
        raise ControlError(reply.error or "request failed")
    return reply


def print_error(args: argparse.Namespace, message: str) -> None:
    """An error as the user asked for output: ``{"error": ...}`` on stdout with ``--json`` (a
    script parses stdout either way), else ``mpnet: error: ...`` on stderr."""
    if getattr(args, "json", False):
        print(json.dumps({"error": message}))
    else:
        print(f"mpnet: error: {message}", file=sys.stderr)


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    if args.config:
        from .pure.config import load_config

        config = load_config(args.config)
        if config["control_socket"]:
            return config.resolve_path(config["control_socket"])
    return default_socket_path()


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def print_status(status: dict[str, Any]) -> None:
    notes = []
    if status.get("checking"):
        notes.append("checking a reload's modules")
    elif status.get("reloading"):
        notes.append("reloading")
    if status.get("reload_failed"):
        notes.append(f"last reload failed: {status['reload_failed']['error']}")
    shares = (status.get("steering") or {}).get("load_shares")
    if shares:
        total = sum(shares.values())
        notes.append(
            "new connections balanced by load ("
            + ", ".join(f"slot {slot} {entries}/{total}" for slot, entries in shares.items())
            + ")"
        )
    print(
        f"mpnet pid {status['pid']}, up {_format_duration(status['uptime'])}, "
        f"generation {status['generation']}, {status['slots']} worker slot(s), {status['state']}"
        + "".join(f"; {note}" for note in notes)
    )
    header: tuple[str, ...] = (
        "slot", "pid", "gen", "state", "conns", "served", "refused", "tls-fail", "cpu%", "rss",
        "uptime",
    )  # fmt: skip
    on_redis = any(w.get("redis") for w in status["workers"])
    if on_redis:
        header += ("redis",)
    rows: list[tuple[str, ...]] = [header]
    for w in status["workers"]:
        rss = f"{w['rss'] / 1048576:.1f}M" if w.get("rss") is not None else "-"
        cpu = f"{w['cpu_percent']:.1f}" if w.get("cpu_percent") is not None else "-"
        rows.append(
            (
                str(w["slot"]),
                str(w["pid"]),
                str(w["generation"]),
                w["state"],
                str(w["connections"]),
                str(w["served"]),
                str(w.get("refused", 0)),
                str(w.get("tls_failures", 0)),
                cpu,
                rss,
                _format_duration(w["uptime"]),
            )
            + ((_redis_cell(w.get("redis")),) if on_redis else ())
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    for w in status["workers"]:
        redis = w.get("redis")
        if redis and redis["state"] != "connected":
            since = time.strftime("%H:%M:%S", time.localtime(redis["since"]))
            print(
                f"redis: worker {w['slot']} (pid {w['pid']}) {redis['state']} since {since} "
                f"({_format_duration(redis['for'])}): {redis['error'] or 'no error given'}"
            )
    print("services:")
    for service in status["services"]:
        print(
            f"  {service['name']} (module {service['module']}) -> {', '.join(service['endpoints'])}"
        )
    figures = status.get("metrics")
    if figures:
        print_service_figures(figures)


def _redis_cell(redis: dict[str, Any] | None) -> str:
    """A worker's Redis state in a few letters: ``up``, ``down 12s`` (``-``: no report yet)."""
    if not redis:
        return "-"
    if redis["state"] == "connected":
        return "up"
    return f"down {_format_duration(redis['for'])}"


def _by_service(figures: dict[str, Any], name: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for row in figures.get(name, []):
        totals[row["service"]] = totals.get(row["service"], 0) + row["value"]
    return totals


def _amount(number: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(number) < 1000:
            return f"{number:.0f}{unit}" if unit == "" else f"{number:.1f}{unit}"
        number /= 1000
    return f"{number:.1f}T"


def print_service_figures(figures: dict[str, Any]) -> None:
    """Per service, since mpnet started (counters survive worker restarts and reloads)."""
    columns = {
        "accepted": "mpnet_connections_accepted_total",
        "open": "mpnet_connections_open",
        "refused": "mpnet_connections_refused_total",
        "bytes-in": "mpnet_received_bytes_total",
        "bytes-out": "mpnet_sent_bytes_total",
        "errors": "mpnet_callback_errors_total",
        "tls-fail": "mpnet_tls_handshake_failures_total",
    }
    values = {title: _by_service(figures, name) for title, name in columns.items()}
    services = sorted({service for column in values.values() for service in column})
    rows = [("service", *columns)]
    for service in services:
        rows.append((service, *(_amount(values[t].get(service, 0)) for t in columns)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def _command(
    build: Callable[[argparse.Namespace], ControlRequest],
    show: Callable[[ControlReply], None] | None = None,
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            reply = request(_socket_path(args), build(args), timeout=args.timeout)
        except ControlError as exc:
            print_error(args, str(exc))
            return 1
        if getattr(args, "json", False):
            print(json.dumps(json.loads(reply.to_json()), indent=2))
        elif show is not None:
            show(reply)
        elif reply.message:
            print(reply.message)
        return 0

    return run


def _reload(args: argparse.Namespace) -> int:
    """Ask for a reload; with ``--wait``, poll until the new generation serves every slot."""
    path = _socket_path(args)
    try:
        reply = request(path, ReloadRequest(), timeout=args.timeout)
        print(reply.message)
        deadline = time.monotonic() + args.timeout
        while args.wait:
            status = _status(path, args.timeout)
            failed = status.get("reload_failed") or {}
            if failed.get("generation") == reply.generation:
                raise ControlError(f"reload failed: {failed.get('error')}")
            if not status["reloading"] and status["generation"] >= (reply.generation or 0):
                print(f"reload complete: generation {status['generation']} serves every slot")
                break
            if time.monotonic() > deadline:
                raise ControlError(f"reload not complete after {args.timeout:g}s")
            time.sleep(0.1)
    except ControlError as exc:
        print(f"mpnet: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _watch(args: argparse.Namespace) -> int:
    """``mpnet top`` (and ``status --watch``): redraw the status every *interval* seconds until
    interrupted."""
    path = _socket_path(args)
    try:
        while True:
            try:
                status = _status(path, args.timeout)
            except ControlError as exc:
                print(f"mpnet: error: {exc}", file=sys.stderr)
                return 1
            sys.stdout.write("\x1b[H\x1b[2J")  # cursor home, clear the screen
            print_status(status)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _status(path: Path, timeout: float) -> dict[str, Any]:
    status = request(path, StatusRequest(), timeout=timeout).status
    if status is None:
        raise ControlError(f"malformed answer from the master at {path}: no status")
    return status


def add_commands(commands: Any) -> None:
    """Register ``status``, ``reload``, ``stop`` and ``workers`` on the CLI parser."""

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-c", "--config", help="config file (to find control_socket)")
        parser.add_argument("-s", "--socket", help="control socket path")
        parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")

    status = commands.add_parser("status", help="show workers and services of a running mpnet")
    common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", action="store_true", help="refresh every --interval seconds")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    show_once = _command(lambda a: StatusRequest(), lambda r: print_status(r.status or {}))
    status.set_defaults(func=lambda a: _watch(a) if a.watch else show_once(a))

    top = commands.add_parser("top", help="the status table, refreshed every second")
    common(top)
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.set_defaults(func=_watch)

    reload = commands.add_parser("reload", help="reload config and modules without downtime")
    common(reload)
    reload.add_argument("--wait", action="store_true", help="return once every slot is replaced")
    reload.set_defaults(func=_reload)

    stop = commands.add_parser("stop", help="stop a running mpnet (graceful by default)")
    common(stop)
    stop.add_argument("--quick", action="store_true", help="close connections now")
    stop.set_defaults(func=_command(lambda a: StopRequest("quick" if a.quick else "graceful")))

    workers = commands.add_parser("workers", help="set the number of workers")
    common(workers)
    workers.add_argument("count", type=int)
    workers.set_defaults(func=_command(lambda a: WorkersRequest(a.count)))
