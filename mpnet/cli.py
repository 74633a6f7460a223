"""The ``mpnet`` command: ``serve``, ``check`` and the control commands.

Errors the user can fix (config, modules, ports) are printed as one line, ``mpnet: error: ...``,
with a non-zero exit: 2 for a bad command line or config, 1 for anything else that stops a start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from . import __version__, controlclient
from . import log as mpnet_log
from .checker import CheckFailed, check_modules
from .portmanager import PortConflict, PortLedger, plan_services
from .pure.config import Config, ConfigError, load_config, with_overrides
from .running import running_instance


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    return with_overrides(config, workers=getattr(args, "workers", None))


def cmd_serve(args: argparse.Namespace) -> int:
    from .fdlimit import raise_fd_limit
    from .master import Master

    config = _load(args)
    mpnet_log.setup(
        args.log_level or config["log_level"],
        config["log_file"],
        role="master",
        log_format=config["log_format"],
        module_levels=config["log_levels"],
    )
    raise_fd_limit()  # inherited by the workers
    master = Master(config, reload_config=lambda: _load(args))
    if args.reload:
        from .devreload import FileWatcher

        master.watcher = FileWatcher()
    _attach_systemd(master)
    return master.run()


def _attach_systemd(master: Any) -> None:
    """Use the notify protocol and socket activation when systemd set them up."""
    try:
        from mpnet import systemd
    except ImportError:
        return
    notifier = systemd.Notifier.from_environ()
    if notifier.enabled:
        master.notifier = notifier
    try:
        master.ledger.adoptable = list(systemd.listen_fds())
    except ValueError as exc:
        raise ConfigError(f"socket activation (LISTEN_FDS): {exc}") from None


def cmd_new(args: argparse.Namespace) -> int:
    """Write a module, its tests and a config (``mpnet new NAME``)."""
    from pathlib import Path

    from .scaffold import create_project

    for path in create_project(args.name, Path(args.directory), args.port):
        print(f"wrote {path}")
    print(f"next: cd {args.directory} && pytest && mpnet serve --reload -c mpnet.toml")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Load everything in a throwaway process and print the port plan (like ``nginx -t``)."""
    config = _load(args)
    mpnet_log.setup("warn", None, role="checker", log_format=config["log_format"])
    report = check_modules(config, float(config["boot_timeout"]))
    plans = plan_services(config, report["services"])
    ledger = PortLedger(config["backlog"])
    ledger.plans = plans
    running = ours = None
    if args.probe:
        running = running_instance(config)
        held = running.endpoints if running else frozenset()
        ledger.check(plans, held_by_us=held)
        ours = sorted({str(e) for p in plans for e in p.endpoints} & held)
    if args.json:
        print(
            json.dumps(
                {
                    "config": config.path,
                    "workers": config.worker_count,
                    "modules": report["modules"],
                    "services": {p.service: [str(e) for e in p.endpoints] for p in plans},
                    "running": {"pid": running.pid, "endpoints": ours} if running else None,
                    "redis": report.get("redis"),
                }
            )
        )
        return 0
    print(f"config {config.path}: ok ({config.worker_count} workers)")
    for line in ledger.describe():
        print(f"  {line}")
    if running and ours:
        print(f"  {', '.join(ours)}: in use by the running mpnet (pid {running.pid})")
    if report.get("redis"):
        print(f"  shared tables on Redis: {report['redis']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpnet",
        description="Prosody-style network services on a pre-forked pool of worker processes.",
    )
    parser.add_argument("--version", action="version", version=f"mpnet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service (master and workers)")
    serve.add_argument("-c", "--config", help="TOML config file (default: the embedded config)")
    serve.add_argument("-w", "--workers", type=_workers_arg, help='worker count or "auto"')
    serve.add_argument("--log-level", choices=["debug", "info", "warn", "error"])
    serve.add_argument(
        "--reload",
        action="store_true",
        help="development: reload when the config or a module file changes",
    )
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser("check", help="validate config and modules, print the port plan")
    check.add_argument("-c", "--config", help="TOML config file (default: the embedded config)")
    check.add_argument("-w", "--workers", type=_workers_arg, help='worker count or "auto"')
    check.add_argument("--json", action="store_true", help="print the plan as JSON")
    check.add_argument(
        "--no-probe",
        dest="probe",
        action="store_false",
        help="do not test whether the ports are free (e.g. to check the running service's config)",
    )
    check.set_defaults(func=cmd_check)

    new = commands.add_parser("new", help="write NAME.py, test_NAME.py and mpnet.toml")
    new.add_argument("name", help="the module's name (letters, digits, underscores)")
    new.add_argument("-d", "--directory", default=".", help="where to write (default: here)")
    new.add_argument("--port", type=int, default=7000, help="the service's port (default 7000)")
    new.set_defaults(func=cmd_new)

    controlclient.add_commands(commands)
    return parser


def _workers_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number or "auto", got {value!r}') from None


LINUX_ONLY = (
    "mpnet runs on Linux only (it relies on fork, SO_REUSEPORT load balancing and passing "
    "descriptors between processes); this system is {platform!r}"
)


def main(argv: list[str] | None = None) -> int:
    if not sys.platform.startswith("linux"):
        print(f"mpnet: error: {LINUX_ONLY.format(platform=sys.platform)}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        controlclient.print_error(args, str(exc))
        return 2
    except (CheckFailed, PortConflict) as exc:
        controlclient.print_error(args, str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os._exit(1)
