"""Service modules: the ``module`` object a module sees, and the loader that runs module files.

A service module is a Python file executed with a ``module`` global already in its namespace, as
Prosody does for Lua modules. Loading happens only in worker processes and in throwaway checker
processes, never in the master.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpnet.pure.config import Config
from mpnet.pure.replica import RESYNC

from .connection import Connection, Service, open_connection
from .lifecycle import Hook, Timer, TimerCallback
from .provider import (
    PROVIDER_FIELDS,
    SERVICE_NAME,
    ModuleError,
    Provider,
    listener_callbacks,
)
from .shared import SharedState, SharedTable

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def bundled_dir() -> Path:
    """Where the bundled service modules live: the ``mpnet.services`` package's folder."""
    from mpnet import services

    return Path(next(iter(services.__path__)))


class Module:
    """The API a service module sees as ``module`` (Prosody's ``module:``).

    Type hint for editors: ``from mpnet import Module`` and ``module: Module``.
    """

    def __init__(self, name: str, path: Path, config: Config) -> None:
        self.name = name
        self.path = path
        self._config = config
        self.providers: list[Provider] = []
        self.logger = logging.getLogger(f"mpnet.module.{name}")
        self._shared: SharedState | None = None
        self._outgoing: dict[int, Any] = {}
        self.timers: set[Timer] = set()
        self.ready_hooks: list[Hook] = []
        self.unload_hooks: list[Hook] = []

    def __repr__(self) -> str:
        return f"<mpnet module {self.name!r} from {self.path}>"

    def provides(self, kind: str, table: dict[str, Any] | None = None, /, **fields: Any) -> None:
        """Declare a provider. Only ``"net"`` exists: a network service with a listener.

        Fields (a dict, keyword arguments, or both): ``listener`` (required), ``default_port``
        or ``default_ports``, ``name`` (default: the module's name), ``encryption``, ``multiplex``.
        """
        where = f"module {self.name!r}"
        if kind != "net":
            raise ModuleError(f"{where}: provides({kind!r}): only 'net' providers exist")
        if table is not None and not isinstance(table, dict):
            raise ModuleError(f"{where}: provides('net', ...): expected a dict of fields")
        merged = {**(table or {}), **fields}
        unknown = set(merged) - PROVIDER_FIELDS
        if unknown:
            raise ModuleError(
                f"{where}: provides('net'): unknown field(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(PROVIDER_FIELDS))}"
            )
        name = merged.get("name", self.name)
        if not isinstance(name, str) or not SERVICE_NAME.fullmatch(name):
            raise ModuleError(
                f"{where}: provider name {name!r} must be letters, digits and single underscores"
            )
        where = f"{where}, service {name!r}"
        if "listener" not in merged:
            raise ModuleError(f"{where}: provides('net') needs a listener")
        ports = merged.get("default_ports", [])
        if "default_port" in merged:
            ports = [merged["default_port"], *ports]
        if isinstance(ports, int):
            ports = [ports]
        if not isinstance(ports, (list, tuple)) or not all(
            type(port) is int and 0 <= port <= 65535 for port in ports
        ):
            raise ModuleError(f"{where}: default_port(s) must be port numbers 0-65535")
        if any(provider.name == name for provider in self.providers):
            raise ModuleError(f"{where}: provided twice")
        listener = merged["listener"]
        if listener is None or isinstance(listener, (str, bytes, int, float)):
            raise ModuleError(f"{where}: listener must be an object or a dict of callbacks")
        options: dict[str, Any] = {k: merged[k] for k in ("encryption", "multiplex") if k in merged}
        if options.get("encryption") not in (None, "ssl"):
            raise ModuleError(f'{where}: encryption must be "ssl" (direct TLS) or absent')
        if "multiplex" in options:
            from .multiplex import compile_rule

            try:
                options["multiplex_rule"] = compile_rule(options["multiplex"], where)
            except ValueError as exc:
                raise ModuleError(str(exc)) from None
        # Callbacks are looked up once the module has finished loading, so that, as in
        # Prosody, a module may fill in its listener after calling provides().
        self.providers.append(Provider(name, self, listener, list(ports), {}, options))

    def log(self, level: str, message: str, *args: Any) -> None:
        """Log as this module: ``module.log("info", "Connection closed: %s", err)``."""
        self.logger.log(LEVELS.get(level, logging.INFO), message, *args)

    def get_option(self, name: str, default: Any = None) -> Any:
        """An option from the module's ``[<module>]`` config table, else a framework key
        of that name, else *default*."""
        table = self._config.module_tables.get(self.name)
        if table is not None and name in table:
            return table[name]
        return self._config.values.get(name, default)

    def _option_error(self, name: str, expected: str, value: Any) -> ModuleError:
        return ModuleError(
            f"module {self.name!r}: option {name!r} must be {expected}, not {value!r} "
            f"(set it in the [{self.name}] table of the config)"
        )

    def get_option_number(
        self,
        name: str,
        default: float | None = None,
        *,
        min: float | None = None,
        max: float | None = None,
    ) -> Any:
        """A number option (an int stays an int; a numeric string is converted, as Prosody
        does); :class:`ModuleError` naming the key if it is not one or is out of range."""
        value = self.get_option(name, default)
        if value is None:
            return None
        number: Any = value
        if isinstance(value, str):
            try:
                number = int(value)
            except ValueError:
                try:
                    number = float(value)
                except ValueError:
                    raise self._option_error(name, "a number", value) from None
        if type(number) not in (int, float) or number != number:
            raise self._option_error(name, "a number", value)
        if min is not None and number < min:
            raise self._option_error(name, f"at least {min:g}", value)
        if max is not None and number > max:
            raise self._option_error(name, f"at most {max:g}", value)
        return number

    def get_option_boolean(self, name: str, default: bool | None = None) -> bool | None:
        """A boolean option (also the strings yes/no, on/off, true/false, 1/0, as Prosody)."""
        value = self.get_option(name, default)
        if value is None or type(value) is bool:
            return value
        words = {"true": True, "yes": True, "on": True, "1": True}
        words.update({"false": False, "no": False, "off": False, "0": False})
        if isinstance(value, (str, int)) and str(value).lower() in words:
            return words[str(value).lower()]
        raise self._option_error(name, "true or false", value)

    def get_option_string(self, name: str, default: str | None = None) -> str | None:
        """A string option; :class:`ModuleError` naming the key for anything else."""
        value = self.get_option(name, default)
        if value is None or isinstance(value, str):
            return value
        raise self._option_error(name, "a string", value)

    def get_option_array(self, name: str, default: list[Any] | None = None) -> list[Any] | None:
        """A list option; a single value counts as a list of one, as in Prosody."""
        value = self.get_option(name, default)
        if value is None or isinstance(value, list):
            return value
        if isinstance(value, (str, int, float, bool)):
            return [value]
        raise self._option_error(name, "a list", value)

    # -- lifecycle (see mpnet.workers.lifecycle) --------------------------------------------

    def add_timer(self, delay: float, callback: TimerCallback) -> Timer:
        """Call *callback* after *delay* seconds, then again after each number it returns (a
        one-shot timer returns None). Returns the :class:`Timer`; ``timer.stop()`` cancels it.
        Timers stop when the worker stops. In the checker, which never serves, none starts."""
        if type(delay) not in (int, float) or delay < 0:
            raise TypeError(f"add_timer: delay must be a number of seconds >= 0, not {delay!r}")
        if not callable(callback):
            raise TypeError("add_timer: the callback must be callable")
        timer = Timer(float(delay), callback, self.logger, self.timers)
        self.timers.add(timer)
        with contextlib.suppress(RuntimeError):  # no loop (the checker): nothing ever fires
            timer.start(asyncio.get_running_loop())
        return timer

    def on_ready(self, hook: Hook) -> None:
        """Run *hook()* once the worker's loop runs and its sockets accept."""
        if not callable(hook):
            raise TypeError("on_ready: the hook must be callable")
        self.ready_hooks.append(hook)

    def on_unload(self, hook: Hook) -> None:
        """Run *hook()* when the worker stops (graceful stop, reload, fewer workers), before
        its connections are closed: flush what must be kept, tell clients goodbye."""
        if not callable(hook):
            raise TypeError("on_unload: the hook must be callable")
        self.unload_hooks.append(hook)

    def shared(self, name: str) -> SharedTable:
        """A table every worker sees (see :mod:`mpnet.workers.shared`)."""
        return self._require_shared().table(name)

    def broadcast(self, topic: str, payload: Any = None) -> None:
        """Run every ``hook(topic, ...)`` handler in every worker, in the master's order."""
        if topic == RESYNC:
            raise ValueError(f"{RESYNC!r} is mpnet's own topic: hook it, do not broadcast it")
        self._require_shared().broadcast(topic, payload)

    def hook(self, topic: str, handler: Callable[[Any], Any]) -> None:
        """Register *handler(payload)* for broadcasts on *topic*."""
        self._require_shared().hook(topic, handler, self.name)

    def connect(
        self,
        host: str,
        port: int,
        listener: Any,
        *,
        timeout: float = 10.0,
        ssl: Any = None,
        server_hostname: str | None = None,
    ) -> Connection:
        """Open an outgoing connection served by *listener*'s callbacks (Prosody's
        ``addclient``). Returns the connection at once; see
        :class:`mpnet.workers.connection.OutgoingConnection`. Worker processes only."""
        service = self._outgoing.get(id(listener))
        if service is None or service.provider.listener is not listener:
            where = f"module {self.name!r}, module.connect()"
            callbacks = listener_callbacks(listener, where)
            provider = Provider(f"{self.name}_outgoing", self, listener, [], callbacks)
            service = Service(provider, "out.")
            self._outgoing[id(listener)] = service
        return open_connection(service, host, port, timeout, ssl, server_hostname or host)

    def _require_shared(self) -> SharedState:
        if self._shared is None:
            # Loaded outside a worker (the checker): a detached replica that goes nowhere.
            self._shared = SharedState(lambda message: None, {})
        return self._shared


@dataclass
class LoadedModules:
    modules: list[Module]

    @property
    def providers(self) -> list[Provider]:
        return [provider for module in self.modules for provider in module.providers]

    def ready_hooks(self) -> list[tuple[Hook, logging.Logger]]:
        return [(hook, m.logger) for m in self.modules for hook in m.ready_hooks]

    def unload_hooks(self) -> list[tuple[Hook, logging.Logger]]:
        return [(hook, m.logger) for m in self.modules for hook in m.unload_hooks]

    def stop_timers(self) -> None:
        for module in self.modules:
            for timer in list(module.timers):
                timer.stop()

    def describe(self) -> list[dict[str, Any]]:
        """Every service as plain data, the framework's multiplex services included when a
        provider joins them (they listen only where the config gives them ports)."""
        services = [provider.describe() for provider in self.providers]
        if any(service["multiplex"] for service in services):
            from .multiplex import MULTIPLEX_SERVICES

            for name in MULTIPLEX_SERVICES:
                services.append(
                    {
                        "name": name,
                        "module": "mpnet",
                        "default_ports": [],
                        "encryption": "ssl" if name.endswith("_ssl") else None,
                        "multiplex": False,
                        "optional": True,
                    }
                )
        return services


def find_module(spec: str, config: Config) -> tuple[str, Path]:
    """Resolve a ``modules`` entry to (name, file): a path to a .py file, or a name looked up
    in ``module_paths`` and then among the bundled modules."""
    if spec.endswith(".py") or "/" in spec:
        path = config.resolve_path(spec)
        if not path.is_file():
            raise ModuleError(f"{config.path}: module file {spec!r} not found (looked at {path})")
        return path.stem, path
    if not SERVICE_NAME.fullmatch(spec):
        raise ModuleError(f"{config.path}: module name {spec!r} is not a valid module name")
    searched = [config.resolve_path(p) for p in config["module_paths"]] + [bundled_dir()]
    for directory in searched:
        candidate = directory / f"{spec}.py"
        if candidate.is_file():
            return spec, candidate
    beside = config.base_dir / f"{spec}.py"
    hint = (
        f'; {beside} exists: write "./{spec}.py" in modules to load that file'
        if beside.is_file()
        else f'; for a file, write its path ("./{spec}.py", relative to the config), or add '
        "its directory to module_paths"
    )
    where = ", ".join(map(str, searched))
    raise ModuleError(f"{config.path}: module {spec!r} not found (searched {where}){hint}")


def _load_error(name: str, path: Path, exc: BaseException) -> ModuleError:
    """A one-line error naming the module, the exception and the line of the module at fault."""
    line = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename == str(path):
            line = f" (line {frame.lineno})"
            break
    if isinstance(exc, SyntaxError):
        line = ""  # its message names the line already
    if isinstance(exc, ModuleError):
        return ModuleError(f"{exc}{line}")
    return ModuleError(
        f"module {name!r} ({path}) failed to load: {type(exc).__name__}: {exc}{line}"
    )


def compile_module(name: str, path: Path) -> types.CodeType:
    """Read and compile a module file (before privileges are dropped: the file may be
    readable by root only, like a config file)."""
    try:
        return compile(path.read_bytes(), str(path), "exec")
    except (OSError, SyntaxError, ValueError) as exc:
        raise _load_error(name, path, exc) from exc


def run_module(
    name: str, path: Path, code: types.CodeType, config: Config, shared: SharedState | None
) -> Module:
    """Execute a compiled module with ``module`` injected; return its :class:`Module`."""
    module = Module(name, path, config)
    module._shared = shared
    namespace = types.ModuleType(f"mpnet.services.{name}")
    namespace.__file__ = str(path)
    namespace.module = module  # type: ignore[attr-defined]
    sys.modules[namespace.__name__] = namespace
    try:
        exec(code, namespace.__dict__)
    except Exception as exc:
        sys.modules.pop(namespace.__name__, None)
        raise _load_error(name, path, exc) from exc
    for provider in module.providers:
        where = f"module {name!r}, service {provider.name!r}"
        provider.callbacks = listener_callbacks(provider.listener, where)
    if not module.providers:
        module.logger.debug("module %s provides no service", name)
    return module


def load_modules(
    config: Config,
    shared: SharedState | None = None,
    before_run: Callable[[], None] | None = None,
) -> LoadedModules:
    """Load every module of the config, in order, and check provider names are unique.

    All files are read and compiled first; *before_run* (e.g. dropping privileges) is called
    before any module code runs.
    """
    compiled: list[tuple[str, Path, types.CodeType]] = []
    for spec in config["modules"]:
        name, path = find_module(spec, config)
        if any(entry[0] == name for entry in compiled):
            raise ModuleError(f"{config.path}: module {name!r} is listed twice")
        compiled.append((name, path, compile_module(name, path)))
    if before_run is not None:
        before_run()
    modules: list[Module] = []
    seen: dict[str, str] = {}
    for name, path, code in compiled:
        module = run_module(name, path, code, config, shared)
        for provider in module.providers:
            if provider.name in seen:
                raise ModuleError(
                    f"service name {provider.name!r} is provided by both module "
                    f"{seen[provider.name]!r} and module {name!r}; set a distinct name="
                )
            seen[provider.name] = name
        modules.append(module)
    loaded = LoadedModules(modules)
    config.check_names([s["name"] for s in loaded.describe()], [m.name for m in modules])
    return loaded
