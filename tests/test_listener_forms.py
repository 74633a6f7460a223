"""Tests for mpnet.workers.module: the forms a listener may take, ``module.provides``, options,
and the loader's error messages (module files are written into tmp_path and loaded for real)."""

from __future__ import annotations

import logging
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from mpnet.pure.config import Config, ConfigError, parse_config
from mpnet.pure.values import check_plain
from mpnet.workers.module import LoadedModules, Module, bundled_dir, load_modules
from mpnet.workers.provider import CALLBACK_NAMES, ModuleError, listener_callbacks

# -- listener_callbacks --------------------------------------------------------------------------


class ClassListener:
    def onconnect(conn):  # Prosody style: plain functions on a class
        return ("connect", conn)

    def onincoming(conn, data):
        return ("incoming", conn, data)

    def ondisconnect(conn, err):
        return ("disconnect", conn, err)

    not_a_callback = 42
    helper = staticmethod(lambda: None)


class InstanceListener:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def onincoming(self, conn: Any, data: bytes) -> None:
        self.seen.append((conn, data))

    def ondrain(self, conn: Any) -> None:
        self.seen.append(("drain", conn))


def test_class_with_plain_functions() -> None:
    found = listener_callbacks(ClassListener, "here")
    assert list(found) == ["onconnect", "onincoming", "ondisconnect"]
    assert found["onincoming"]("c", b"x") == ("incoming", "c", b"x")
    assert found["onconnect"]("c") == ("connect", "c")
    assert found["ondisconnect"]("c", None) == ("disconnect", "c", None)


def test_instance_with_methods() -> None:
    listener = InstanceListener()
    found = listener_callbacks(listener, "here")
    assert list(found) == ["onincoming", "ondrain"]
    found["onincoming"]("conn", b"data")
    found["ondrain"]("conn")
    assert listener.seen == [("conn", b"data"), ("drain", "conn")]


def test_simple_namespace() -> None:
    calls: list[Any] = []
    listener = types.SimpleNamespace(
        onconnect=lambda conn: calls.append(conn), onreadtimeout=lambda conn: True
    )
    found = listener_callbacks(listener, "here")
    assert list(found) == ["onconnect", "onreadtimeout"]
    found["onconnect"]("c")
    assert calls == ["c"]


def test_dict_listener() -> None:
    def onincoming(conn: Any, data: bytes) -> None:
        pass

    async def onconnect(conn: Any) -> None:
        pass

    found = listener_callbacks(
        {"onincoming": onincoming, "onconnect": onconnect, "unrelated": 1}, "here"
    )
    assert found == {"onconnect": onconnect, "onincoming": onincoming}


def test_module_object_listener() -> None:
    namespace = types.ModuleType("listener_module")
    namespace.onstarttls = lambda conn: None  # type: ignore[attr-defined]
    assert list(listener_callbacks(namespace, "here")) == ["onstarttls"]


def test_missing_and_none_callbacks_are_skipped() -> None:
    handler = print
    found = listener_callbacks({"onconnect": None, "ondisconnect": handler}, "here")
    assert found == {"ondisconnect": handler}
    found = listener_callbacks(types.SimpleNamespace(onincoming=None, ondrain=handler), "here")
    assert found == {"ondrain": handler}


def test_every_callback_name_is_recognised() -> None:
    listener = {name: (lambda *a: None) for name in CALLBACK_NAMES}
    assert list(listener_callbacks(listener, "here")) == list(CALLBACK_NAMES)


@pytest.mark.parametrize(
    "listener",
    [
        {"onincoming": "not callable"},
        types.SimpleNamespace(onconnect=print, onincoming=b"bytes"),
        type("L", (), {"onincoming": 5}),
    ],
    ids=["dict", "namespace", "class"],
)
def test_non_callable_callback_is_an_error(listener: Any) -> None:
    with pytest.raises(ModuleError) as caught:
        listener_callbacks(listener, "module 'm', service 's'")
    message = str(caught.value)
    assert message == "module 'm', service 's': listener.onincoming is not callable"


@pytest.mark.parametrize(
    "listener",
    [{}, {"other": print}, types.SimpleNamespace(), object(), type("Empty", (), {})],
    ids=["empty dict", "unrelated dict", "namespace", "object", "class"],
)
def test_listener_without_callbacks_is_an_error(listener: Any) -> None:
    with pytest.raises(ModuleError) as caught:
        listener_callbacks(listener, "where")
    message = str(caught.value)
    assert message.startswith("where: listener has none of the callbacks ")
    for name in CALLBACK_NAMES:
        assert name in message


# -- loading modules from files ------------------------------------------------------------------

CONFIG_PATH = "/etc/mpnet/listener.toml"


class Env:
    """A tmp_path with a mods/ directory for module files and a config that points at it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mods = root / "mods"
        self.mods.mkdir()

    def module(self, name: str, source: str, directory: Path | None = None) -> Path:
        path = (directory or self.mods) / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return path

    def config(self, modules: list[str], extra: str = "") -> Config:
        text = f'modules = {modules!r}\nmodule_paths = ["mods"]\n{extra}'
        return parse_config(text.replace("'", '"'), CONFIG_PATH, self.root)

    def load(self, modules: list[str], extra: str = "", **kwargs: Any) -> LoadedModules:
        return load_modules(self.config(modules, extra), **kwargs)

    def error(self, modules: list[str], extra: str = "") -> str:
        with pytest.raises(ModuleError) as caught:
            self.load(modules, extra)
        message = str(caught.value)
        assert "\n" not in message, message
        return message


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


LISTENER = """\
class listener:
    def onincoming(conn, data):
        conn.write(data)
"""


def test_provides_with_a_dict(env: Env) -> None:
    env.module(
        "first", LISTENER + 'module.provides("net", {"default_port": 5433, "listener": listener})\n'
    )
    loaded = env.load(["first"])
    (module,) = loaded.modules
    assert isinstance(module, Module)
    assert module.name == "first"
    assert module.path == env.mods / "first.py"
    (provider,) = loaded.providers
    assert provider.name == "first"  # the name defaults to the module's
    assert provider.module is module
    assert provider.default_ports == [5433]
    assert list(provider.callbacks) == ["onincoming"]
    described = provider.describe()
    check_plain(described)  # it travels from the checker process to the master
    assert described["name"] == "first"
    assert described["module"] == "first"
    assert described["default_ports"] == [5433]
    assert described["encryption"] is None


def test_provides_with_keyword_arguments(env: Env) -> None:
    env.module(
        "kw",
        LISTENER + 'module.provides("net", listener=listener, default_ports=[1, 2], name="svc", '
        'encryption="ssl")\n',
    )
    (provider,) = env.load(["kw"]).providers
    assert provider.name == "svc"
    assert provider.default_ports == [1, 2]
    assert provider.options == {"encryption": "ssl"}
    assert provider.describe()["encryption"] == "ssl"


def test_provides_dict_and_keywords_merge(env: Env) -> None:
    env.module(
        "merge",
        LISTENER + 'module.provides("net", {"listener": listener, "default_port": 1}, '
        'default_port=2, name="merged")\n',
    )
    (provider,) = env.load(["merge"]).providers
    assert (provider.name, provider.default_ports) == ("merged", [2])


def test_default_port_and_default_ports_combine(env: Env) -> None:
    env.module(
        "both",
        LISTENER
        + 'module.provides("net", listener=listener, default_port=80, default_ports=(81, 82))\n',
    )
    (provider,) = env.load(["both"]).providers
    assert provider.default_ports == [80, 81, 82]


def test_default_ports_as_a_single_int(env: Env) -> None:
    env.module("single", LISTENER + 'module.provides("net", listener=listener, default_ports=7)\n')
    assert env.load(["single"]).providers[0].default_ports == [7]


def test_no_default_port_is_allowed_at_load(env: Env) -> None:
    env.module("portless", LISTENER + 'module.provides("net", listener=listener)\n')
    assert env.load(["portless"]).providers[0].default_ports == []


def test_several_services_in_one_module(env: Env) -> None:
    env.module(
        "multi",
        LISTENER + 'module.provides("net", listener=listener, default_port=1)\n'
        'module.provides("net", listener=listener, default_port=2, name="multi_admin")\n',
    )
    loaded = env.load(["multi"])
    assert [p.name for p in loaded.providers] == ["multi", "multi_admin"]


def test_a_module_may_provide_nothing(env: Env) -> None:
    env.module("quiet", "x = 1\n")
    loaded = env.load(["quiet"])
    assert [m.name for m in loaded.modules] == ["quiet"]
    assert loaded.providers == []


def test_listener_filled_in_after_provides(env: Env) -> None:
    """Prosody order: provides() first, the callbacks defined afterwards."""
    env.module(
        "late",
        """\
        import types
        listener = types.SimpleNamespace()
        table = {}
        module.provides("net", {"default_port": 1, "listener": listener})
        module.provides("net", {"default_port": 2, "listener": table, "name": "late_dict"})

        def onincoming(conn, data):
            return data

        listener.onincoming = onincoming
        table["onconnect"] = onincoming
        """,
    )
    first, second = env.load(["late"]).providers
    assert list(first.callbacks) == ["onincoming"]
    assert list(second.callbacks) == ["onconnect"]


def test_listener_never_filled_in_is_an_error(env: Env) -> None:
    env.module(
        "empty",
        'import types\nmodule.provides("net", listener=types.SimpleNamespace(), default_port=1)\n',
    )
    message = env.error(["empty"])
    assert "module 'empty', service 'empty'" in message
    assert "listener has none of the callbacks" in message


def test_non_callable_callback_in_a_module_names_the_service(env: Env) -> None:
    env.module(
        "broken_cb",
        'module.provides("net", listener={"onincoming": 3}, default_port=1, name="svc")\n',
    )
    message = env.error(["broken_cb"])
    assert message == "module 'broken_cb', service 'svc': listener.onincoming is not callable"


@pytest.mark.parametrize(
    "name", ["bad-name", "1abc", "a__b", "_a", "a_", "", "with space", "é", 5, None]
)
def test_invalid_provider_names(env: Env, name: Any) -> None:
    env.module("names", LISTENER + f'module.provides("net", listener=listener, name={name!r})\n')
    message = env.error(["names"])
    assert f"provider name {name!r}" in message
    assert "letters, digits and single underscores" in message
    assert "(line 4)" in message


def test_provider_name_with_trailing_newline_is_invalid(env: Env) -> None:
    env.module("nl", LISTENER + 'module.provides("net", listener=listener, name="echo\\n")\n')
    env.error(["nl"])


def test_valid_provider_names(env: Env) -> None:
    env.module(
        "valid",
        LISTENER + "for n in ['a', 'A1', 'my_chat', 'x_1_y', 'Z9z']:\n"
        '    module.provides("net", listener=listener, name=n, default_port=1)\n',
    )
    names = [p.name for p in env.load(["valid"]).providers]
    assert names == ["a", "A1", "my_chat", "x_1_y", "Z9z"]


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        ('"net", listener=listener, port=5', "unknown field(s) port; known: "),
        ('"net", {"listener": listener, "default": 1, "zzz": 2}', "unknown field(s) default, zzz"),
        ('"http", listener=listener', "provides('http'): only 'net' providers exist"),
        ('"net", [listener]', "expected a dict of fields"),
        ('"net", default_port=1', "provides('net') needs a listener"),
        ('"net", listener="onincoming"', "listener must be an object or a dict of callbacks"),
        ('"net", listener=None', "listener must be an object or a dict of callbacks"),
        ('"net", listener=listener, default_port=70000', "default_port(s) must be port numbers"),
        ('"net", listener=listener, default_port=-1', "default_port(s) must be port numbers"),
        ('"net", listener=listener, default_port="80"', "default_port(s) must be port numbers"),
        ('"net", listener=listener, default_port=True', "default_port(s) must be port numbers"),
        ('"net", listener=listener, default_ports=[1, 2.0]', "default_port(s) must be"),
        ('"net", listener=listener, default_ports="80"', "default_port(s) must be"),
        ('"net", listener=listener, encryption="tls"', 'encryption must be "ssl"'),
    ],
)
def test_invalid_provides(env: Env, call: str, expected: str) -> None:
    env.module("prov", LISTENER + f"module.provides({call})\n")
    message = env.error(["prov"])
    assert message.startswith("module 'prov'")
    assert expected in message
    assert message.endswith("(line 4)")


def test_unknown_field_lists_the_known_ones(env: Env) -> None:
    env.module("prov", LISTENER + 'module.provides("net", listener=listener, colour="red")\n')
    message = env.error(["prov"])
    for field in ("default_port", "default_ports", "encryption", "listener", "multiplex", "name"):
        assert field in message


def test_provided_twice_in_one_module(env: Env) -> None:
    env.module(
        "twice",
        LISTENER + 'module.provides("net", listener=listener, default_port=1)\n'
        'module.provides("net", listener=listener, default_port=2)\n',
    )
    message = env.error(["twice"])
    assert "service 'twice'" in message and "provided twice" in message
    assert "(line 5)" in message


def test_duplicate_service_names_across_modules(env: Env) -> None:
    env.module("one", LISTENER + 'module.provides("net", listener=listener, name="shared_name")\n')
    env.module("two", LISTENER + 'module.provides("net", listener=listener, name="shared_name")\n')
    message = env.error(["one", "two"])
    assert "'shared_name'" in message
    assert "module 'one' and module 'two'" in message
    assert "name=" in message


def test_module_listed_twice(env: Env) -> None:
    env.module("dup", LISTENER)
    message = env.error(["dup", "mods/dup.py"])
    assert message == f"{CONFIG_PATH}: module 'dup' is listed twice"


# -- module options ------------------------------------------------------------------------------


def test_get_option_from_the_module_table(env: Env) -> None:
    env.module(
        "opts",
        """\
        RESULT = [
            module.get_option("greeting"),
            module.get_option("limit", 10),
            module.get_option("missing"),
            module.get_option("missing", "dflt"),
            module.get_option("backlog"),
            module.get_option("nested"),
        ]
        """,
    )
    loaded = env.load(["opts"], '\n[opts]\ngreeting = "hi"\nlimit = 3\nnested = { a = [1] }\n')
    result = sys.modules["mpnet.services.opts"].RESULT
    assert result == ["hi", 3, None, "dflt", 1024, {"a": [1]}]
    assert loaded.modules[0].get_option("greeting") == "hi"


def test_get_option_ignores_other_modules_tables(env: Env) -> None:
    env.module("mine", "")
    env.module("theirs", "")
    loaded = env.load(["mine", "theirs"], '\n[theirs]\nsecret = "x"\n')
    mine, theirs = loaded.modules
    assert mine.get_option("secret") is None
    assert theirs.get_option("secret") == "x"


def test_module_log(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    env.module("talker", 'module.log("warn", "hello %s", "world")\nmodule.log("bogus", "x")\n')
    with caplog.at_level(logging.DEBUG, logger="mpnet.module.talker"):
        env.load(["talker"])
    records = [
        (r.name, r.levelno, r.getMessage()) for r in caplog.records if r.name.endswith("talker")
    ]
    assert ("mpnet.module.talker", logging.WARNING, "hello world") in records
    assert ("mpnet.module.talker", logging.INFO, "x") in records


def test_module_global_is_the_module_object(env: Env) -> None:
    env.module("me", "SEEN = module\n")
    (module,) = env.load(["me"]).modules
    assert sys.modules["mpnet.services.me"].SEEN is module
    assert sys.modules["mpnet.services.me"].__file__ == str(env.mods / "me.py")
    assert repr(module) == f"<mpnet module 'me' from {env.mods / 'me.py'}>"


def test_config_names_are_checked_after_loading(env: Env) -> None:
    env.module("real", LISTENER + 'module.provides("net", listener=listener, default_port=1)\n')
    with pytest.raises(ConfigError, match="did you mean 'real'"):
        env.load(["real"], "reel_ports = 5\n")
    with pytest.raises(ConfigError, match=r"table \[rael\]"):
        env.load(["real"], "\n[rael]\nx = 1\n")
    env.load(["real"], "real_ports = 5\n\n[real]\nx = 1\n")


# -- load errors ---------------------------------------------------------------------------------


def test_module_raising_on_load(env: Env) -> None:
    env.module("boom", 'x = 1\ny = 2\nraise RuntimeError("it broke")\n')
    message = env.error(["boom"])
    path = env.mods / "boom.py"
    assert message == f"module 'boom' ({path}) failed to load: RuntimeError: it broke (line 3)"


def test_module_raising_inside_a_function(env: Env) -> None:
    env.module(
        "deep",
        """\
        def helper():
            return {}["missing"]

        def outer():
            helper()

        outer()
        """,
    )
    message = env.error(["deep"])
    assert "module 'deep'" in message
    assert "KeyError: 'missing'" in message
    assert message.endswith("(line 2)")  # the innermost line of the module itself


def test_module_raising_inside_a_library_names_the_module_line(env: Env) -> None:
    env.module("lib", 'import json\n\nvalue = json.loads("{not json")\n')
    message = env.error(["lib"])
    assert "module 'lib'" in message and "JSONDecodeError" in message
    assert message.endswith("(line 3)")


def test_module_import_error(env: Env) -> None:
    env.module("imp", "import no_such_package_for_mpnet_tests\n")
    message = env.error(["imp"])
    assert "ModuleNotFoundError" in message
    assert "no_such_package_for_mpnet_tests" in message
    assert message.endswith("(line 1)")


def test_syntax_error_names_the_line(env: Env) -> None:
    env.module("bad", "x = 1\n\ndef broken(:\n    pass\n")
    message = env.error(["bad"])
    assert "module 'bad'" in message
    assert "SyntaxError" in message
    assert "line 3" in message
    assert message.count("line 3") == 1


def test_indentation_error(env: Env) -> None:
    env.module("indent", "if True:\nx = 1\n")
    message = env.error(["indent"])
    assert "IndentationError" in message and "line 2" in message


def test_syntax_error_stops_before_any_module_runs(env: Env) -> None:
    marker = env.root / "ran"
    env.module("good", f"with open({str(marker)!r}, 'a') as out:\n    out.write('good')\n")
    env.module("bad", "def (\n")
    with pytest.raises(ModuleError, match="'bad'"):
        env.load(["good", "bad"])
    assert not marker.exists()


def test_before_run_is_called_after_compiling_and_before_running(env: Env) -> None:
    log = env.root / "order"
    for name in ("a", "b"):
        env.module(name, f"with open({str(log)!r}, 'a') as out:\n    out.write('run {name}\\n')\n")

    def before_run() -> None:
        with open(log, "a") as out:
            out.write("before\n")

    env.load(["a", "b"], before_run=before_run)
    assert log.read_text() == "before\nrun a\nrun b\n"


def test_missing_module_lists_the_searched_directories(env: Env) -> None:
    other = env.root / "more"
    other.mkdir()
    config = parse_config(
        'modules = ["nowhere"]\nmodule_paths = ["mods", "more"]\n', CONFIG_PATH, env.root
    )
    with pytest.raises(ModuleError) as caught:
        load_modules(config)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{CONFIG_PATH}: module 'nowhere' not found (searched ")
    for directory in (env.mods, other, bundled_dir()):
        assert str(directory) in message


def test_missing_module_file_path(env: Env) -> None:
    message = env.error(["mods/absent.py"])
    assert f"module file 'mods/absent.py' not found (looked at {env.mods / 'absent.py'})" in message


def test_module_by_path(env: Env) -> None:
    elsewhere = env.root / "elsewhere"
    elsewhere.mkdir()
    env.module("by_path", LISTENER + 'module.provides("net", listener=listener)\n', elsewhere)
    loaded = env.load(["elsewhere/by_path.py"])  # relative to the config's directory
    assert loaded.modules[0].name == "by_path"
    assert loaded.providers[0].name == "by_path"
    absolute = env.load([str(elsewhere / "by_path.py")])
    assert absolute.modules[0].path == elsewhere / "by_path.py"


def test_module_file_with_an_invalid_service_name_needs_name(env: Env) -> None:
    env.module("my-mod", LISTENER + 'module.provides("net", listener=listener)\n')
    message = env.error(["mods/my-mod.py"])
    assert "provider name 'my-mod'" in message
    env.module("my-mod", LISTENER + 'module.provides("net", listener=listener, name="mymod")\n')
    assert env.load(["mods/my-mod.py"]).providers[0].name == "mymod"


@pytest.mark.parametrize("spec", ["bad-name", "a.b", "9lives"])
def test_invalid_module_name(env: Env, spec: str) -> None:
    message = env.error([spec])
    assert message == f"{CONFIG_PATH}: module name {spec!r} is not a valid module name"


def test_module_paths_are_searched_in_order_before_the_bundled_ones(env: Env) -> None:
    env.module("echo", LISTENER + 'module.provides("net", listener=listener, default_port=1)\n')
    (module,) = env.load(["echo"]).modules
    assert module.path == env.mods / "echo.py"
    assert module.providers[0].default_ports == [1]


def test_bundled_echo_loads(tmp_path: Path) -> None:
    config = parse_config('modules = ["echo"]\n', CONFIG_PATH, tmp_path)
    (provider,) = load_modules(config).providers
    assert provider.name == "echo"
    assert provider.module.path == bundled_dir() / "echo.py"
    assert provider.default_ports == [5432]
    assert set(provider.callbacks) >= {"onincoming"}


def test_helpers_are_usable_without_a_worker(env: Env) -> None:
    """Loaded outside a worker (the checker), shared tables and hooks still work locally."""
    env.module(
        "sharer",
        """\
        table = module.shared("counts")
        table["loaded"] = 1
        module.hook("topic", lambda payload: None)
        module.broadcast("topic", {"x": 1})
        SEEN = dict(table)
        """,
    )
    env.load(["sharer"])
    assert sys.modules["mpnet.services.sharer"].SEEN == {"loaded": 1}
