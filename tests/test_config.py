"""config.py: TOML -> frozen dataclasses, every problem reported at load, and reload diffs.

Malformed files live in tests/configs/bad_*.toml, each with its expected error text in BAD below;
good configs are mostly written inline (or into tmp_path when they need relative paths).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import stat
from pathlib import Path

import pytest

from pubmon.config.checks import find_cycles, parse_listen, parse_signal
from pubmon.config.diff import FIELD_EFFECTS, daemon_changes, diff_configs
from pubmon.config.load import check_config_main, load_config, parse_config
from pubmon.config.model import Backoff, Config, CrashLoop, LogSpec, ProbeSpec, PublisherSpec
from pubmon.errors import ConfigError

CONFIGS = Path(__file__).parent / "configs"


def parse(text: str, folder: Path | None = None) -> Config:
    """Parse `text` as if it were pubmon.toml in `folder` (default: tests/configs)."""
    return parse_config(text, (folder or CONFIGS) / "pubmon.toml")


def problems(text: str, folder: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, folder)
    return [str(p) for p in info.value.problems]


def one_problem(text: str, folder: Path | None = None) -> str:
    found = problems(text, folder)
    assert len(found) == 1, found
    return found[0]


# --- malformed files ------------------------------------------------------------------------

# file -> substrings that must all appear in the error text (the dotted key and what was expected)
BAD: dict[str, list[str]] = {
    "bad_toml_syntax.toml": ["invalid TOML", "line 3"],
    "bad_unknown_key.toml": ["publisher.feed.bakoff: unknown key", "did you mean 'backoff'"],
    "bad_unknown_section.toml": ["deamon: unknown key", "did you mean 'daemon'"],
    "bad_string_for_number.toml": [
        "daemon.shutdown_timeout: expected a number, got string 'x'",
    ],
    "bad_bool_for_number.toml": [
        "publisher.feed.start_timeout: expected a number, got boolean true",
    ],
    "bad_float_for_int.toml": [
        "publisher.feed.numprocs: expected an integer in 1..1000, got float 2.5",
    ],
    "bad_port_range.toml": ["publisher.feed.port: expected an integer in 1..65535, got 70000"],
    "bad_port_overflow.toml": ["publisher.feed.port:", "numprocs 2", "exceeds 65535"],
    "bad_name.toml": ['publisher."feed:0": invalid publisher name', "':' is kept"],
    "bad_publisher_not_table.toml": ["publisher.feed: expected a table"],
    "bad_command_missing.toml": ["publisher.feed.command: required"],
    "bad_command_empty.toml": ["publisher.feed.command: expected a non-empty command"],
    "bad_command_type.toml": [
        "publisher.feed.command: item 2: expected a string, got integer 60",
    ],
    "bad_command_shlex.toml": [
        "publisher.feed.command: cannot split the command string",
        "No closing quotation",
    ],
    "bad_command_not_found.toml": [
        "publisher.feed.command: executable 'pubmon-no-such-program' not found",
    ],
    "bad_command_path_missing.toml": [
        "publisher.feed.command: executable './bin/no-such-publisher' not found",
        str(CONFIGS / "bin" / "no-such-publisher"),
    ],
    "bad_placeholder.toml": [
        "publisher.feed.command:",
        "unknown placeholder {host}",
        "{port}, {name}, {index}",
    ],
    "bad_placeholder_brace.toml": ["publisher.feed.command:", "Single '}'", "{{ and }}"],
    "bad_port_placeholder_without_port.toml": [
        "publisher.feed.command:",
        "{port}",
        "no port set",
    ],
    "bad_restart.toml": [
        "publisher.feed.restart: expected one of 'always' | 'on-failure' | 'never'",
        "got string 'sometimes'",
    ],
    "bad_stop_signal.toml": [
        "publisher.feed.stop_signal: expected a signal name",
        "got string 'TERMINATE'",
    ],
    "bad_directory_missing.toml": [
        "publisher.feed.directory: expected an existing directory",
        str(CONFIGS / "no-such-directory"),
    ],
    "bad_environment_value.toml": [
        "publisher.feed.environment.RETRIES: expected a string, got integer 3",
    ],
    "bad_user_empty.toml": ["publisher.feed.user: expected a non-empty string"],
    "bad_exit_codes.toml": [
        "publisher.feed.success_exit_codes: item 2: expected an integer in 0..255, got 256",
    ],
    "bad_backoff_factor.toml": ["publisher.feed.backoff.factor: expected a number >= 1, got 0.5"],
    "bad_backoff_max.toml": [
        "publisher.feed.backoff.max: expected a number >= initial 120, got 60 (the default)",
    ],
    "bad_backoff_jitter.toml": ["publisher.feed.backoff.jitter: expected a number in 0..1"],
    "bad_crash_loop.toml": [
        "publisher.feed.crash_loop.max_restarts: expected an integer >= 0, got -1",
        "publisher.feed.crash_loop.window: expected a number > 0, got 0",
    ],
    "bad_log.toml": [
        "publisher.feed.log.max_line: expected an integer in 64..16777216, got 10",
        "publisher.feed.log.ring_lines: expected an integer >= 1, got 0",
        "publisher.feed.log.echo: expected true or false, got string 'yes'",
    ],
    "bad_nan.toml": ["publisher.feed.stop_timeout: expected a finite number, got float nan"],
    "bad_depends_unknown.toml": ["publisher.feed.depends_on: unknown publisher 'database'"],
    "bad_depends_instance.toml": [
        "publisher.feed.depends_on: unknown publisher 'db:0'",
        "not an instance",
    ],
    "bad_depends_self.toml": ["publisher.feed.depends_on: 'feed' cannot depend on itself"],
    "bad_depends_cycle.toml": ["publisher.a.depends_on: dependency cycle: a -> b -> c -> a"],
    "bad_duplicate_port.toml": [
        "publisher.other.port: port 9102 of other is already used by feed:2",
    ],
    "bad_probe_port_conflict.toml": [
        "publisher.other.probe.port: the probe of other would connect to port 9100",
        "feed",
    ],
    "bad_monitor_port_conflict.toml": [
        "publisher.feed.port: port 9101 of feed is also the monitor.listen port",
    ],
    "bad_probe_kind.toml": [
        "publisher.feed.probe.kind: expected one of 'none' | 'fb303' | 'tcp' | 'exec'",
        "got string 'http'",
    ],
    "bad_probe_exec_without_command.toml": [
        "publisher.feed.probe.command: required when kind = 'exec'",
    ],
    "bad_probe_command_not_exec.toml": [
        "publisher.feed.probe.command: only allowed with kind = 'exec', not 'tcp'",
    ],
    "bad_probe_needs_port.toml": [
        "publisher.feed.probe.port: probe kind 'fb303' needs a port",
    ],
    "bad_probe_timeout.toml": [
        "publisher.feed.probe.timeout: expected a number <= interval 1, got 3",
    ],
    "bad_data_source.toml": ["publisher.feed.data_source: needs probe kind 'fb303', not 'tcp'"],
    "bad_listen.toml": ['monitor.listen: expected "host:port"', "'localhost'"],
    "bad_listen_ipv6.toml": ["monitor.listen: IPv6 addresses go in brackets", '"[::1]:9090"'],
    "bad_listen_port.toml": ["monitor.listen: expected a port in 0..65535, got '99999'"],
    "bad_tls_pair.toml": ["monitor.tls_key: required with tls_cert"],
    "bad_tls_file_missing.toml": [
        "monitor.tls_cert: expected an existing file",
        "monitor.tls_key: expected an existing file",
        str(CONFIGS / "no-such-key.pem"),
    ],
    "bad_allow_control.toml": [
        "monitor.allow_control: true is no longer accepted",
        "allow = { control = [",
    ],
    "bad_allow_levels.toml": [
        "control.allow.logs: item 1: no group named 'no-such-group-x' on this host",
        "control.allow.control: item 2: no user named 'no-such-user-x' on this host",
        "control.allow.stats: unknown key (did you mean 'status'?)",
        "monitor.allow.logs: item 1: expected a SAN as DNS:, IP:, email: or URI:",
        "monitor.allow.control: needs tls_client_ca",
    ],
    "bad_max_frame.toml": [
        "monitor.max_frame: expected an integer in 1024..268435456, got 512",
        "monitor.max_connections: expected an integer >= 1, got 0",
    ],
    "bad_allow_uids.toml": ["control.allow_uids: item 2: expected an integer in 0..", "got -1"],
    "bad_section_type.toml": ["daemon: expected a table, got integer 5"],
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_reports_key_and_expectation(name: str) -> None:
    path = CONFIGS / name
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    for expected in BAD[name]:
        assert expected in text, f"{expected!r} not in:\n{text}"
    assert info.value.file == str(path)
    assert text.startswith(f"{path}: ")  # the message names the file


def test_every_bad_fixture_has_expectations() -> None:
    on_disk = {p.name for p in CONFIGS.glob("bad_*.toml")} - {"bad_many_problems.toml"}
    assert on_disk == set(BAD)


def test_all_problems_of_a_file_are_reported_together_in_file_order() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "bad_many_problems.toml")
    keys = [p.key for p in info.value.problems]
    assert keys == [
        "daemon.shutdown_timeout",
        "monitor.listen",
        "publisher.feed.command",
        "publisher.feed.restart",
        "publisher.feed.backoff.factor",
        "publisher.feed.probe.interval",
        "publisher.other.port",
        "publisher.other.depends_on",
        "publisher.other.colour",
    ]
    text = str(info.value)
    assert text.startswith(f"{CONFIGS / 'bad_many_problems.toml'}: 9 error(s):\n")
    assert "executable 'pubmon-no-such-program' not found" in text
    assert "port 9102 of other is already used by feed:1" in text
    assert "unknown publisher 'ghost'" in text


def test_missing_file_names_the_os_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p.key for p in info.value.problems] == [""]
    assert "No such file or directory (ENOENT)" in str(info.value)
    assert str(info.value).startswith(str(path))


def test_unreadable_file_names_the_os_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Is a directory"):
        load_config(tmp_path)


def test_invalid_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[daemon]\nlog_dir = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_invalid_toml_gives_line_and_column() -> None:
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 2, column 5"):
        parse("[daemon]\nx = = 1\n")


# --- good configs ---------------------------------------------------------------------------


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    config = load_config(path)
    assert config == Config(path=str(path))
    assert config.publishers == ()
    assert config.control.socket == "/run/pubmon/pubmon.sock"
    assert config.monitor.address() is None  # no TCP listener unless [monitor] asks for one


def test_relative_config_path_becomes_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pubmon.toml").write_text('[daemon]\nlog_dir = "logs"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config("pubmon.toml")
    assert config.path == str(tmp_path / "pubmon.toml")
    assert config.daemon.log_dir == str(tmp_path / "logs")


def test_full_example_reads_every_key() -> None:
    config = load_config(CONFIGS / "good_full.toml")
    assert config.daemon.log_dir == str(CONFIGS / "logs")
    assert config.daemon.shutdown_timeout == 30.0
    assert config.control.socket == str(CONFIGS / "run" / "pubmon.sock")
    assert config.control.allow_uids == (0, 1000)
    allow = config.control.allow
    assert [p.spelled for p in allow.status] == ["*"]
    assert [p.key for p in allow.logs] == ["gid:100", "gid:27"]
    assert [(p.spelled, p.key) for p in allow.control] == [("root", "uid:0"), ("1000", "uid:1000")]
    monitor = config.monitor
    assert monitor.address() == ("::1", 0)
    assert monitor.tls_cert == monitor.tls_key == str(CONFIGS / "certs" / "server.pem")
    assert [p.key for p in monitor.allow.status] == ["*"]  # the default
    assert [p.key for p in monitor.allow.logs] == ["DNS:dash.example"]
    assert [p.key for p in monitor.allow.control] == ["subject:CN=operator,O=pubmon", "IP:10.0.0.7"]
    assert (monitor.max_frame, monitor.idle_timeout, monitor.max_connections) == (2 << 20, 60, 16)

    assert [s.name for s in config.publishers] == ["feed:0", "feed:1", "upstream"]
    feed = config.publishers[1]
    assert feed.program == "feed" and feed.index == 1 and feed.numprocs == 2
    assert feed.command == ("sleep", "--port=9102", "--name=feed:1", "--index=1", "{literal}")
    assert feed.port == 9102
    assert feed.directory == str(CONFIGS)
    assert feed.environment == (("ALPHA", "1"), ("FEED_MODE", "live"))  # sorted by name
    assert feed.user == "nobody"  # not looked up at load: a missing user is a runtime failure
    assert feed.autostart is False
    assert feed.depends_on == ("upstream",)
    assert feed.restart == "on-failure"
    assert feed.success_exit_codes == frozenset({0, 3})
    assert feed.start_timeout == 0.0 and feed.stop_timeout == 2.5
    assert feed.stop_signal is signal.SIGINT
    assert feed.backoff == Backoff(initial=1, max=30, factor=1.5, jitter=0, reset_after=0)
    assert feed.crash_loop == CrashLoop(max_restarts=0, window=60)
    assert feed.data_source == "tcp://upstream:1234"
    assert feed.log == LogSpec(max_bytes=0, backups=0, ring_lines=1, max_line=64, echo=True)
    assert feed.probe == ProbeSpec(
        kind="fb303",
        interval=1,
        timeout=1,
        failure_threshold=1,
        transport="buffered",
        host="localhost",
        port=9102,  # the instance's own port
    )
    upstream = config.publisher("upstream")
    assert upstream is not None
    assert upstream.command == ("/bin/sh", "-c", "exec sleep 60")  # shlex-split
    assert upstream.probe.kind == "exec" and upstream.probe.command == ("true", "upstream")
    assert config.publisher("nope") is None


def test_defaults_of_a_minimal_publisher() -> None:
    (spec,) = parse('[publisher.feed]\ncommand = ["sleep", "60"]\n').publishers
    assert spec.name == "feed" and spec.program == "feed" and spec.index == 0
    assert spec.port is None and spec.directory is None and spec.user is None
    assert spec.environment == () and spec.depends_on == ()
    assert spec.autostart is True and spec.restart == "always"
    assert spec.success_exit_codes == frozenset({0})
    assert spec.stop_signal is signal.SIGTERM
    assert spec.backoff == Backoff() and spec.crash_loop == CrashLoop()
    assert spec.log == LogSpec() and spec.probe == ProbeSpec()


def test_numprocs_expands_instances_with_ports_and_placeholders() -> None:
    config = parse(
        "[publisher.feed]\n"
        'command = "sleep 60 --port={port} --name={name} --i={index:02d} {{port}}"\n'
        "port = 9100\nnumprocs = 3\n"
    )
    assert [(s.name, s.index, s.port) for s in config.publishers] == [
        ("feed:0", 0, 9100),
        ("feed:1", 1, 9101),
        ("feed:2", 2, 9102),
    ]
    assert config.publishers[2].command == (
        "sleep",
        "60",
        "--port=9102",
        "--name=feed:2",
        "--i=02",
        "{port}",
    )


@pytest.mark.parametrize(
    ("arg", "why"),
    [
        ("{}", "unknown placeholder {}"),
        ("{0}", "unknown placeholder {0}"),
        ("{name[0]}", "unknown placeholder {name[0]}"),
        ("{name.upper}", "unknown placeholder {name.upper}"),
        ("{index:{port}}", "unknown placeholder {index:{port}}"),
        ("{name:d}", "Unknown format code 'd'"),
        ("{port!x}", "Unknown conversion specifier x"),
        ("{port", "expected '}' before end of string"),
    ],
)
def test_bad_placeholders(arg: str, why: str) -> None:
    text = f'[publisher.feed]\ncommand = ["sleep", "{arg}"]\nport = 9100\n'
    found = one_problem(text)
    assert found.startswith("publisher.feed.command: ") and why in found


def test_placeholders_in_the_probe_command() -> None:
    (spec,) = parse(
        '[publisher.feed]\ncommand = "sleep 60"\nport = 9100\n'
        '[publisher.feed.probe]\nkind = "exec"\ncommand = ["true", "{name}:{port}"]\n'
    ).publishers
    assert spec.probe.command == ("true", "feed:9100")
    why = one_problem(
        '[publisher.feed]\ncommand = "sleep 60"\n'
        '[publisher.feed.probe]\nkind = "exec"\ncommand = ["true", "{host}"]\n'
    )
    assert why.startswith("publisher.feed.probe.command: ")


def test_probe_command_needs_kind_exec_even_by_default() -> None:
    why = one_problem('[publisher.feed]\ncommand = "sleep 60"\nprobe = { command = "true" }\n')
    assert why == "publisher.feed.probe.command: only allowed with kind = 'exec', not 'none'"


def test_numprocs_one_keeps_the_plain_name() -> None:
    (spec,) = parse('[publisher.feed]\ncommand = "sleep {name}-{index}"\n').publishers
    assert spec.name == "feed" and spec.command == ("sleep", "feed-0")


def test_probe_port_shifts_with_the_instance() -> None:
    config = parse(
        '[publisher.feed]\ncommand = "sleep 60"\nport = 9100\nnumprocs = 2\n'
        '[publisher.feed.probe]\nkind = "tcp"\nport = 9200\n'
    )
    assert [s.probe.port for s in config.publishers] == [9200, 9201]


def test_probe_port_defaults_to_the_instance_port() -> None:
    config = parse(
        '[publisher.feed]\ncommand = "sleep 60"\nport = 9100\nnumprocs = 2\n'
        '[publisher.feed.probe]\nkind = "fb303"\n'
    )
    assert [s.probe.port for s in config.publishers] == [9100, 9101]


def test_probe_on_a_remote_host_may_use_any_port() -> None:
    parse(
        '[publisher.a]\ncommand = "sleep 60"\nport = 9100\n'
        '[publisher.b]\ncommand = "sleep 60"\n'
        '[publisher.b.probe]\nkind = "tcp"\nhost = "192.0.2.1"\nport = 9100\n'
    )


def test_ints_are_accepted_where_floats_are_expected() -> None:
    (spec,) = parse('[publisher.feed]\ncommand = "sleep 60"\nstop_timeout = 3\n').publishers
    assert spec.stop_timeout == 3.0 and isinstance(spec.stop_timeout, float)


def test_float_where_an_integer_is_expected_is_an_error_even_when_whole() -> None:
    why = one_problem('[publisher.feed]\ncommand = "sleep 60"\nport = 9100.0\n')
    assert why == "publisher.feed.port: expected an integer in 1..65535, got float 9100.0"


def test_bool_is_not_an_integer() -> None:
    why = one_problem('[publisher.feed]\ncommand = "sleep 60"\nnumprocs = true\n')
    assert why == "publisher.feed.numprocs: expected an integer in 1..1000, got boolean true"


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "srv" / "bin").mkdir(parents=True)
    program = tmp_path / "srv" / "bin" / "publisher"
    program.write_text("#!/bin/sh\nexec sleep 60\n")
    program.chmod(0o755)
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "run").write_text("")
    config = parse(
        '[daemon]\nlog_dir = "log"\n[control]\nsocket = "pubmon.sock"\n'
        '[publisher.a]\ncommand = ["./bin/publisher", "x"]\ndirectory = "srv"\n'
        '[publisher.b]\ncommand = ["tools/run"]\n',
        tmp_path,
    )
    assert config.daemon.log_dir == str(tmp_path / "log")
    assert config.control.socket == str(tmp_path / "pubmon.sock")
    a, b = config.publishers
    assert a.directory == str(tmp_path / "srv")
    assert a.command == (str(program), "x")  # relative to directory, stored absolute
    assert b.command == (str(tmp_path / "tools" / "run"),)  # no directory: the config folder


def test_program_that_exists_but_is_not_executable_loads(tmp_path: Path) -> None:
    program = tmp_path / "not-executable"
    program.write_text("")
    program.chmod(stat.S_IRUSR)
    (spec,) = parse('[publisher.feed]\ncommand = ["./not-executable"]\n', tmp_path).publishers
    assert spec.command == (str(program),)


def test_program_that_is_a_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    why = one_problem('[publisher.feed]\ncommand = ["./bin"]\n', tmp_path)
    assert why.startswith("publisher.feed.command: executable './bin' is a directory")


def test_program_is_searched_on_the_publishers_own_path(tmp_path: Path) -> None:
    (tmp_path / "only-here").write_text("#!/bin/sh\n")
    (tmp_path / "only-here").chmod(0o755)
    text = '[publisher.feed]\ncommand = ["only-here"]\n'
    assert "executable 'only-here' not found on PATH" in one_problem(text)
    (spec,) = parse(text + f'environment = {{ PATH = "{tmp_path}" }}\n').publishers
    assert spec.command == ("only-here",)  # bare names stay bare: exec searches PATH


def test_missing_directory_is_reported_once(tmp_path: Path) -> None:
    why = one_problem('[publisher.feed]\ncommand = ["./run"]\ndirectory = "gone"\n', tmp_path)
    assert why.startswith("publisher.feed.directory: expected an existing directory")


def test_bad_port_is_not_also_reported_as_missing_port() -> None:
    why = one_problem('[publisher.feed]\ncommand = "sleep {port}"\nport = "x"\n')
    assert why == "publisher.feed.port: expected an integer in 1..65535, got string 'x'"


def test_control_socket_empty_means_none() -> None:
    assert parse('[control]\nsocket = ""\n').control.socket is None


def test_monitor_listen_empty_means_no_listener() -> None:
    config = parse('[monitor]\nlisten = ""\n[publisher.feed]\ncommand = "sleep 1"\nport = 9090\n')
    assert config.monitor.address() is None


def test_monitor_port_conflicts_with_a_publisher() -> None:
    why = one_problem(
        '[monitor]\nlisten = "127.0.0.1:9090"\n[publisher.feed]\ncommand = "sleep 1"\nport = 9090\n'
    )
    assert why == "publisher.feed.port: port 9090 of feed is also the monitor.listen port"


def test_invalid_listen_is_not_also_a_port_conflict() -> None:
    why = one_problem(
        '[monitor]\nlisten = "x"\n[publisher.feed]\ncommand = "sleep 1"\nport = 9090\n'
    )
    assert why.startswith("monitor.listen: ")


def test_mutual_tls_config(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("")
    config = parse(
        '[monitor]\ntls_cert = "cert.pem"\ntls_key = "key.pem"\n'
        'tls_client_ca = "ca.pem"\nallow = { control = ["O=pubmon, CN=op\\\\,x"] }\n',
        tmp_path,
    )
    assert config.monitor.tls_client_ca == str(tmp_path / "ca.pem")
    # attributes in any order, names in any case, escaped commas kept
    assert [p.key for p in config.monitor.allow.control] == ["subject:CN=op\\,x,O=pubmon"]


def test_client_ca_needs_a_server_certificate(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    why = one_problem('[monitor]\ntls_client_ca = "ca.pem"\n', tmp_path)
    assert why.startswith("monitor.tls_client_ca: needs tls_cert and tls_key")


def test_depends_on_duplicates_are_kept_once() -> None:
    config = parse(
        '[publisher.a]\ncommand = "sleep 1"\n'
        '[publisher.b]\ncommand = "sleep 1"\ndepends_on = ["a", "a"]\n'
    )
    assert config.publishers[1].depends_on == ("a",)


def test_two_cycles_are_both_named() -> None:
    found = problems(
        '[publisher.a]\ncommand = "sleep 1"\ndepends_on = ["b"]\n'
        '[publisher.b]\ncommand = "sleep 1"\ndepends_on = ["a"]\n'
        '[publisher.c]\ncommand = "sleep 1"\ndepends_on = ["d"]\n'
        '[publisher.d]\ncommand = "sleep 1"\ndepends_on = ["c"]\n'
    )
    assert found == [
        "publisher.a.depends_on: dependency cycle: a -> b -> a",
        "publisher.c.depends_on: dependency cycle: c -> d -> c",
    ]


def test_find_cycles_handles_long_chains() -> None:
    chain = {str(i): [str(i + 1)] for i in range(5000)}
    chain["5000"] = []
    assert find_cycles(chain) == []
    chain["5000"] = ["0"]
    (cycle,) = find_cycles(chain)
    assert cycle[0] == cycle[-1] == "0" and len(cycle) == 5002


def test_names_with_dots_are_quoted_in_keys() -> None:
    why = one_problem('[publisher."feed.eu"]\ncommand = "sleep 1"\nport = 0\n')
    assert why.startswith('publisher."feed.eu".port: ')


def test_instances_are_in_file_order() -> None:
    config = parse(
        '[publisher.zeta]\ncommand = "sleep 1"\n[publisher.alpha]\ncommand = "sleep 1"\n'
    )
    assert [s.name for s in config.publishers] == ["zeta", "alpha"]


def test_config_is_frozen() -> None:
    config = parse('[publisher.feed]\ncommand = "sleep 1"\n')
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.publishers[0].port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("TERM", signal.SIGTERM),
        ("term", signal.SIGTERM),
        ("SIGTERM", signal.SIGTERM),
        ("sigHup", signal.SIGHUP),
        ("KILL", signal.SIGKILL),
        ("QUIT", signal.SIGQUIT),
        ("usr1", signal.SIGUSR1),
        ("USR2", signal.SIGUSR2),
        ("INT", signal.SIGINT),
    ],
)
def test_signal_names(text: str, expected: signal.Signals) -> None:
    assert parse_signal(text) is expected


@pytest.mark.parametrize("bad", ["TERMINATE", "", "SIG", "SIG_DFL", "_DFL", 15, True])
def test_bad_signal_names(bad: object) -> None:
    with pytest.raises(ValueError, match="expected a signal name"):
        parse_signal(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9090", ("::1", 9090)),
        ("[::]:65535", ("::", 65535)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "bad", [":9090", "host", "host:", "host:x", "host:65536", "[::1]", "[nope]:1", "::1:80"]
)
def test_bad_listen_addresses(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(bad)


# --- diff -----------------------------------------------------------------------------------

BASE = """
[publisher.keep]
command = "sleep 60"
[publisher.respawn]
command = "sleep 60"
[publisher.tune]
command = "sleep 60"
[publisher.gone]
command = "sleep 60"
[publisher.pool]
command = "sleep 60 {port}"
port = 9100
numprocs = 2
"""


def test_diff_sorts_instances_into_actions() -> None:
    old = parse(BASE)
    new = parse(
        BASE.replace('[publisher.gone]\ncommand = "sleep 60"\n', "")
        .replace('respawn]\ncommand = "sleep 60"', 'respawn]\ncommand = "sleep 61"')
        .replace('tune]\ncommand = "sleep 60"', 'tune]\ncommand = "sleep 60"\nstop_timeout = 1')
        .replace("numprocs = 2", "numprocs = 3")
        + '[publisher.fresh]\ncommand = "sleep 60"\n'
    )
    diff = diff_configs(old, new)
    assert diff.added == ("fresh", "pool:2")
    assert diff.removed == ("gone",)
    assert diff.changed == ("respawn",)
    assert diff.policy_only == ("pool:0", "pool:1", "tune")  # numprocs is not a spawn setting
    assert diff.unchanged == ("keep",)
    by_name = {c.name: (c.change, c.fields) for c in diff.changes}
    assert by_name["respawn"] == ("restarted", ("command",))
    assert by_name["tune"] == ("updated", ("stop_timeout",))
    assert by_name["pool:0"] == ("updated", ("numprocs",))
    # The new config's order, removed ones last.
    assert [c.name for c in diff.changes][-1] == "gone"


def test_every_publisher_field_has_a_reload_effect() -> None:
    # A new field of PublisherSpec must say what a reload does with it.
    assert set(FIELD_EFFECTS) == {f.name for f in dataclasses.fields(PublisherSpec)}


def test_diff_names_probe_settings_with_dotted_keys() -> None:
    old = parse('[publisher.a]\ncommand = "sleep 1"\n')
    new = parse(
        '[publisher.a]\ncommand = "sleep 1"\n'
        '[publisher.a.probe]\nkind = "tcp"\nport = 1\ninterval = 0.5\ntimeout = 0.25\n'
    )
    (change,) = diff_configs(old, new).changes
    assert change.change == "updated"
    assert change.fields == ("probe.kind", "probe.interval", "probe.timeout", "probe.port")


def test_diff_of_identical_configs_is_all_unchanged() -> None:
    diff = diff_configs(parse(BASE), parse(BASE))
    assert diff.unchanged == ("gone", "keep", "pool:0", "pool:1", "respawn", "tune")
    assert diff.added == diff.removed == diff.changed == diff.policy_only == ()


def test_diff_environment_and_user_are_spawn_settings() -> None:
    old = parse('[publisher.a]\ncommand = "sleep 1"\n[publisher.b]\ncommand = "sleep 1"\n')
    new = parse(
        '[publisher.a]\ncommand = "sleep 1"\nenvironment = { X = "1" }\n'
        '[publisher.b]\ncommand = "sleep 1"\nuser = "nobody"\n'
    )
    assert diff_configs(old, new).changed == ("a", "b")


def test_diff_reordered_environment_is_unchanged() -> None:
    old = parse('[publisher.a]\ncommand = "sleep 1"\nenvironment = { X = "1", Y = "2" }\n')
    new = parse('[publisher.a]\ncommand = "sleep 1"\nenvironment = { Y = "2", X = "1" }\n')
    assert diff_configs(old, new).unchanged == ("a",)


def test_diff_numprocs_one_to_two_renames_the_instance() -> None:
    old = parse('[publisher.a]\ncommand = "sleep 1"\n')
    new = parse('[publisher.a]\ncommand = "sleep 1"\nnumprocs = 2\n')
    diff = diff_configs(old, new)
    assert (diff.added, diff.removed) == (("a:0", "a:1"), ("a",))


# --- check-config ---------------------------------------------------------------------------


def test_check_config_main_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_config_main(str(CONFIGS / "good_full.toml")) == 0
    out, err = capsys.readouterr()
    assert out == "ok: 2 publishers (3 instances)\n"
    if os.geteuid() == 0:  # only a root daemon would run it as root
        path = CONFIGS / "good_full.toml"
        assert err == (
            f"warning: {path}: publisher.upstream: no `user`: it runs as root with the daemon's "
            'capabilities; name a user (user = "...") unless it really needs root\n'
        )


def test_check_config_main_error(capsys: pytest.CaptureFixture[str]) -> None:
    path = CONFIGS / "bad_many_problems.toml"
    assert check_config_main(str(path)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{path}: 9 error(s):\n  daemon.shutdown_timeout: ")


def test_fixture_paths_are_not_executable_by_accident() -> None:
    # bad_command_path_missing.toml relies on tests/configs/bin not existing.
    assert not os.path.exists(CONFIGS / "bin")


def test_inherit_environment_takes_names_or_a_boolean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBMON_TEST_KEEP", "kept")
    monkeypatch.setenv("PUBMON_TEST_DROP", "dropped")
    cfg = parse(
        '[daemon]\ninherit_environment = ["PUBMON_TEST_KEEP", "PUBMON_TEST_ABSENT"]\n'
        '[publisher.a]\ncommand = "sleep 1"\nenvironment = { X = "1" }\n'
        '[publisher.b]\ncommand = "sleep 1"\ninherit_environment = false\n'
        '[publisher.c]\ncommand = "sleep 1"\ninherit_environment = true\n'
        'environment = { PUBMON_TEST_DROP = "mine" }\n'
    )
    a, b, c = cfg.publishers
    assert a.environment == (("PUBMON_TEST_KEEP", "kept"), ("X", "1"))
    assert a.inherit_environment == ("PUBMON_TEST_KEEP", "PUBMON_TEST_ABSENT")
    assert b.environment == () and b.inherit_environment is False
    assert dict(c.environment)["PUBMON_TEST_DROP"] == "mine"  # the table wins
    assert dict(c.environment)["PUBMON_TEST_KEEP"] == "kept"
    assert problems('[publisher.a]\ncommand = "sleep 1"\ninherit_environment = ["A=B", 3]\n') == [
        "publisher.a.inherit_environment: item 2: expected a string, got integer 3",
    ]
    assert problems('[daemon]\ninherit_environment = ["A=B"]\n') == [
        "daemon.inherit_environment: invalid variable name 'A=B' (empty, or has '=')",
    ]


def test_a_reload_reports_a_changed_log_mode_in_octal_as_the_file_writes_it() -> None:
    old = Config(path="/etc/pubmon.toml", publishers=())
    new = dataclasses.replace(old, daemon=dataclasses.replace(old.daemon, log_mode=0o640))
    assert daemon_changes(old, new) == ["daemon.log_mode: None -> 0o640"]
