"""What a container expects around pubmon (issue 14): config from the environment
(`${VAR}`, `PUBMON_CONFIG`), `critical` and `log_stdout` in the config, `pubmon status --check`
as an exec probe, and the Containerfile in deploy/ built and run where a runtime can."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from daemons import daemon_header, run_daemon, toml_publisher
from pubmon.config.load import parse_config
from pubmon.config.model import Config
from pubmon.errors import ConfigError

CONFIGS = Path(__file__).parent / "configs"
DEPLOY = Path(__file__).parent.parent / "deploy"


def parse(text: str) -> Config:
    return parse_config(text, CONFIGS / "pubmon.toml")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return [str(p) for p in info.value.problems]


# --- ${VAR} expansion -----------------------------------------------------------------------


def test_variables_and_defaults_are_expanded_in_string_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PUBMON_T_SECS", "60")
    monkeypatch.setenv("PUBMON_T_EMPTY", "")
    monkeypatch.delenv("PUBMON_T_UNSET", raising=False)
    config = parse(
        "[monitor]\n"
        'listen = "${PUBMON_T_HOST:-127.0.0.1}:${PUBMON_T_PORT:-9191}"\n'
        "[publisher.feed]\n"
        'command = ["sleep", "${PUBMON_T_SECS}", "${PUBMON_T_EMPTY:-dflt}", "[${PUBMON_T_EMPTY}]",'
        ' "${{x}}", "$HOME"]\n'
        'environment = { WHO = "${PUBMON_T_UNSET:-nobody}", RAW = "${{PUBMON_T_SECS}}" }\n'
    )
    assert config.monitor.listen == "127.0.0.1:9191"
    (spec,) = config.publishers
    # "${{x}}" is no variable (a literal "${x}" once {} placeholders are expanded, in commands
    # and environments); "$HOME" is left for a shell.
    assert spec.command[1:] == ("60", "dflt", "[]", "${x}", "$HOME")
    env = dict(spec.environment)
    assert (env["WHO"], env["RAW"]) == ("nobody", "${PUBMON_T_SECS}")


def test_a_doubled_dollar_is_a_literal_where_no_placeholders_are_expanded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PUBMON_T_SECS", "60")
    config = parse(f'[control]\nsocket = "{tmp_path}/$${{PUBMON_T_SECS}}.sock"\n')
    assert config.control.socket == f"{tmp_path}/${{PUBMON_T_SECS}}.sock"


def test_an_unset_variable_without_a_default_is_a_problem_naming_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PUBMON_T_UNSET", raising=False)
    found = problems(
        '[daemon]\nlog_dir = "/var/log/${PUBMON_T_UNSET}"\n'
        '[publisher.feed]\ncommand = ["sleep", "${PUBMON_T_UNSET}"]\n'
    )
    assert len(found) == 2, found
    assert found[0].startswith("daemon.log_dir: ${PUBMON_T_UNSET}: environment variable")
    assert found[1].startswith("publisher.feed.command: ${PUBMON_T_UNSET}: environment variable")
    assert "not set" in found[1]


# --- critical, log_stdout -------------------------------------------------------------------


def test_critical_and_log_stdout_are_read_and_checked() -> None:
    config = parse('[publisher.feed]\ncommand = ["sleep", "1"]\ncritical = true\n')
    assert config.publishers[0].critical
    assert config.daemon.log_stdout is None  # the default: on when PID 1 without log_dir
    config = parse('[daemon]\nlog_stdout = false\n[publisher.feed]\ncommand = ["sleep", "1"]\n')
    assert config.daemon.log_stdout is False and not config.publishers[0].critical
    found = problems(
        '[daemon]\nlog_stdout = "yes"\n[publisher.feed]\ncommand = ["sleep", "1"]\ncritical = 1\n'
    )
    assert [p.split(":")[0] for p in found] == ["daemon.log_stdout", "publisher.feed.critical"]


# --- PUBMON_CONFIG --------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pubmon", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_pubmon_config_is_the_default_config_path(tmp_path: Path) -> None:
    config = tmp_path / "pubmon.toml"
    config.write_text(daemon_header(tmp_path, log_dir=False) + toml_publisher("a", ["true"]))
    env = {k: v for k, v in os.environ.items() if k != "PUBMON_CONFIG"}
    missing = _cli("daemon", env=env)
    assert missing.returncode == 64  # a usage error
    assert "--config FILE (or $PUBMON_CONFIG)" in missing.stderr
    missing = _cli("check-config", env=env)
    assert missing.returncode == 64
    assert "FILE (or $PUBMON_CONFIG)" in missing.stderr
    ok = _cli("check-config", env={**env, "PUBMON_CONFIG": str(config)})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: 1 publisher")


async def test_daemon_reads_pubmon_config(tmp_path: Path) -> None:
    config = tmp_path / "pubmon.toml"
    config.write_text(daemon_header(tmp_path) + toml_publisher("a", ["sleep", "3600"]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pubmon",
        "daemon",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PUBMON_CONFIG": str(config)},
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            while b"ready: 1/1 publishers running" not in (line := await proc.stderr.readline()):
                assert line, "the daemon ended before it was ready"
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await proc.stderr.read()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- status --check -------------------------------------------------------------------------


async def _status_check(sock: Path, *names: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pubmon",
        "status",
        "--check",
        *names,
        "--socket",
        str(sock),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_check_is_0_only_when_all_named_run_and_are_healthy(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(3600)"]
    body = (
        toml_publisher("up", sleeper)
        + toml_publisher(
            "probed",
            sleeper,
            probe={"kind": "exec", "command": ["true"], "interval": 0.5, "timeout": 0.5},
            start_timeout=10,
        )
        + toml_publisher("off", sleeper, autostart=False)
    )
    config = tmp_path / "pubmon.toml"
    config.write_text(daemon_header(tmp_path, socket=True) + body)
    sock = tmp_path / "pubmon.sock"
    async with run_daemon(config) as d:
        assert await _status_check(sock, "up", "probed") == (0, "", "")
        code, out, err = await _status_check(sock)
        assert (code, out) == (1, "")
        assert err.startswith("off: STOPPED") and "up" not in err
        assert (await _status_check(sock, "off"))[0] == 1
        assert (await _status_check(sock, "nosuch"))[0] == 6
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0
    assert (await _status_check(sock))[0] == 4  # no daemon: not ready


# --- deploy/ --------------------------------------------------------------------------------


def test_the_deploy_configs_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PUBMON_MONITOR_LISTEN", raising=False)
    monkeypatch.delenv("REGION", raising=False)
    image = parse_config((DEPLOY / "pubmon.toml").read_text(), DEPLOY / "pubmon.toml")
    # The ConfigMap's pubmon.toml: the indented block after "pubmon.toml: |".
    yaml = (DEPLOY / "kubernetes" / "configmap.yaml").read_text()
    block = yaml.split("pubmon.toml: |\n", 1)[1]
    text = "".join(line[4:] + "\n" for line in block.splitlines())
    mapped = parse_config(text, DEPLOY / "pubmon.toml")
    for config in (image, mapped):
        assert config.daemon.log_dir is None and config.daemon.log_stdout is None
        assert config.control.socket == "/run/pubmon/pubmon.sock"
        assert [p.critical for p in config.publishers] == [True]
        assert dict(config.publishers[0].environment)["REGION"] == "local"
    deployment = (DEPLOY / "kubernetes" / "deployment.yaml").read_text()
    grace = int(deployment.split("terminationGracePeriodSeconds: ")[1].split()[0])
    assert grace > mapped.daemon.shutdown_timeout + 5


# --- the Containerfile ----------------------------------------------------------------------


def _runtime() -> tuple[str | None, str]:
    """A container runtime that can build and run here, or why there is none."""
    for tool in ("podman", "docker"):
        path = shutil.which(tool)
        if path is None:
            continue
        info = subprocess.run([path, "info"], capture_output=True, text=True, timeout=60)
        if info.returncode == 0:
            return path, ""
        return None, f"{tool} is installed but cannot run: {info.stderr.strip()[:200]}"
    return None, "no container runtime (podman, docker) installed"


@pytest.mark.slow
def test_the_containerfile_builds_and_runs_pubmon_as_pid1() -> None:
    runtime, why = _runtime()
    if runtime is None:
        pytest.skip(f"cannot build deploy/Containerfile here: {why}")
    tag = "pubmon-test:latest"
    build = subprocess.run(
        [runtime, "build", "-f", str(DEPLOY / "Containerfile"), "-t", tag, str(DEPLOY.parent)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if build.returncode != 0 and "pull" in build.stderr.lower():
        pytest.skip(f"{runtime} cannot pull the base image here: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-2000:]
    try:
        run = subprocess.run(
            [runtime, "run", "--rm", "--stop-timeout", "20", tag, "check-config"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
    finally:
        subprocess.run([runtime, "rmi", "-f", tag], capture_output=True, timeout=120)
