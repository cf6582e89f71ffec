"""A cgroup per publisher (pubmon.core.cgroup) against this machine's real cgroup2 hierarchy.

Each test gets a cgroup2 directory of its own below this process's cgroup (`cgroup_dir`),
which plays the subtree pubmon manages (`[daemon] cgroup = "<dir>"`); pytest itself stays
where it is. This kernel's cgroup2 offers cgroup.kill, cgroup.freeze, cgroup.events and
cpu.stat but no memory/cpu/pids controllers (bound to cgroup v1 here): the limit files are
checked against a plain test directory (`test_cgroup_limits_are_written_...`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from children import SLEEP, config, py, spec
from daemons import daemon_header, run_daemon, toml_publisher
from procs import alive, descendants
from pubmon.config.load import parse_config
from pubmon.config.model import Limits, ProbeSpec, PublisherSpec
from pubmon.core import publisher as publisher_module
from pubmon.core import usage as usage_module
from pubmon.core.cgroup import Cgroup, Cgroups, own_cgroup
from pubmon.core.lifecycle import PublisherState
from pubmon.core.memsweep import MemorySweep
from pubmon.core.procstats import ProcStats
from pubmon.core.publisher import Publisher
from pubmon.core.supervisor import Supervisor
from pubmon.core.usage import UsageReader
from pubmon.errors import ConfigError, InvalidState
from pubmon.host.cgroupfs import FileWatch
from pubmon.http import metrics as metrics_module
from pubmon.http.metrics import DaemonValues, MetricsWriter
from pubmon.http.server import _row
from pubmon.service.handler import PubmonHandler
from pubmon.thrift import idl
from supervised import supervising

S = PublisherState
_seq = itertools.count()


def _usable_parent() -> Path | None:
    own = own_cgroup()
    if own is None or os.geteuid() != 0:
        return None
    probe = Path(own) / f"pubmon-test-cgprobe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return None
    try:
        return Path(own) if (probe / "cgroup.kill").exists() else None
    finally:
        probe.rmdir()


PARENT = _usable_parent()
needs_cgroup = pytest.mark.skipif(
    PARENT is None, reason="needs root and a writable cgroup2 hierarchy with cgroup.kill"
)


def _remove_tree(top: Path) -> None:
    for group in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        (group / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 5  # a SIGKILL'd process leaves within milliseconds
        while "populated 1" in (group / "cgroup.events").read_text():
            assert time.monotonic() < deadline, f"{group} still populated"
            time.sleep(0.005)
        group.rmdir()
    top.rmdir()


@pytest.fixture
def cgroup_dir() -> Iterator[Path]:
    assert PARENT is not None
    top = PARENT / f"pubmon-test-cg-{os.getpid()}-{next(_seq)}"
    top.mkdir()
    try:
        yield top
    finally:
        _remove_tree(top)


@asynccontextmanager
async def running(
    *specs: PublisherSpec, cgroup: Path | None
) -> AsyncIterator[tuple[Supervisor, Cgroups | None]]:
    groups = Cgroups.setup(str(cgroup)) if cgroup is not None else None
    async with supervising(config(*specs), cgroups=groups) as sup:
        yield sup, groups


async def in_state(pub: Publisher, *states: S, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        await pub.wait_until(lambda: pub.state in states)


async def line_with(pub: Publisher, text: str, timeout: float = 10, after: int = 0) -> str:
    """The first line after `after` (a seq) that contains `text`."""
    async with asyncio.timeout(timeout):
        seq = after
        while True:
            for line in pub.output.tail(seq, 1000).lines:
                seq = line.seq
                if text in line.text:
                    return line.text
            await pub.output.wait_beyond(seq)


# The leader's child calls setsid and forks the grandchild, then exits: the grandchild is in
# no group of the publisher's and is orphaned to the daemon (a classic daemonizing program).
DOUBLE_FORK = py(
    "import os, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        print('escapee', os.getpid(), flush=True)\n"
    "        time.sleep(3600)\n"
    "    os._exit(0)\n"
    "print('leader', os.getpid(), flush=True)\n"
    "time.sleep(3600)\n"
)


@needs_cgroup
async def test_a_stop_takes_the_setsid_escapee_and_a_restart_never_meets_the_old_tree(
    cgroup_dir: Path,
) -> None:
    async with running(spec("feed", DOUBLE_FORK), cgroup=cgroup_dir) as (sup, _):
        pub = sup.get("feed")
        escapee = int((await line_with(pub, "escapee")).split()[1])
        assert pub.cgroup is not None and escapee in pub.cgroup.pids()
        assert pub.pid is not None  # the escapee is out of the publisher's session and group
        assert os.getsid(escapee) != os.getsid(pub.pid) and os.getpgid(escapee) != pub.pid
        await sup.stop("feed")
        # Stopped means the whole cgroup is empty, not only that the leader exited.
        assert pub.state == S.STOPPED and not alive(escapee)
        assert not pub.cgroup.populated() and pub.cgroup.pids() == []
        seq = pub.output.last_seq
        await sup.start("feed")
        again = int((await line_with(pub, "escapee", after=seq)).split()[1])
        # The new run spawned into the same (emptied) cgroup: only its own tree is there.
        assert set(pub.cgroup.pids()) == {pub.pid, again}
        await sup.restart("feed")  # a restart, too, ends the escapee before the new spawn
        assert not alive(again) and again not in pub.cgroup.pids()


@needs_cgroup
async def test_the_daemon_moves_into_a_leaf_of_the_cgroup_it_is_in(
    cgroup_dir: Path, tmp_path: Path
) -> None:
    # Standalone, `[daemon] cgroup` names the daemon's own cgroup: it must leave it for
    # `supervisor` (no internal processes), publishers go to the siblings pub-<name>.
    (tmp_path / "logs").mkdir()
    cfg = tmp_path / "pubmon.toml"
    header = daemon_header(tmp_path, socket=True).replace(
        "[daemon]\n", f'[daemon]\ncgroup = "{cgroup_dir}"\n'
    )
    limits = {"memory_max": "64M", "nofile": 1000}
    cfg.write_text(
        header
        + toml_publisher("feed", list(DOUBLE_FORK))
        + toml_publisher("capped", ["sleep", "3600"], limits=limits)
    )
    wrap = ("sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup_dir))
    async with run_daemon(cfg, wrap=wrap) as d:
        await d.wait_log("ready:")
        assert (cgroup_dir / "supervisor" / "cgroup.procs").read_text().split() == [str(d.pid)]
        pids = d.publisher_pids()
        for name in ("feed", "capped"):
            procs = (cgroup_dir / f"pub-{name}" / "cgroup.procs").read_text().split()
            assert str(pids[name]) in procs
        # memory_max cannot be applied here (no memory controller): a warning, it still runs.
        await d.wait_log("publisher.capped.limits.memory_max: no memory controller")
        sock = tmp_path / "pubmon.sock"
        status = await _cli("status", "--socket", str(sock))
        head = status.splitlines()[0].split()
        assert head[5:8] == ["CPU", "MEM", "TASKS"], status
        feed_row = next(r.split() for r in status.splitlines() if r.startswith("feed "))
        assert feed_row[7] == "2"  # the leader and the escapee (whose parent left)
        assert "PAUSED" in await _cli("pause", "feed", "--socket", str(sock))
        assert (cgroup_dir / "pub-feed" / "cgroup.freeze").read_text().strip() == "1"
        assert "RUNNING" in await _cli("resume", "feed", "--socket", str(sock))
        escapees = (cgroup_dir / "pub-feed" / "cgroup.procs").read_text().split()
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0
    assert not any(alive(int(p)) for p in escapees)
    # A clean stop leaves the directory as the daemon found it: no pub-* groups, no
    # supervisor leaf (it moved back into cgroup_dir before it exited).
    assert [p.name for p in cgroup_dir.iterdir() if p.is_dir()] == []


async def _cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pubmon",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


# Allocates (and touches) 80 MiB on its first run only: a marker file says it ran before.
def _grower(marker: Path) -> tuple[str, ...]:
    return py(
        "import os, time\n"
        f"first = not os.path.exists({str(marker)!r})\n"
        f"open({str(marker)!r}, 'a').close()\n"
        "blob = b'x' * (80 << 20) if first else b''\n"
        "print('allocated', len(blob), flush=True)\n"
        "time.sleep(3600)\n"
    )


@pytest.mark.parametrize("where", ["cgroup", "proc"])
async def test_memory_past_memory_restart_restarts_it_once_with_reason_memory(
    where: str, tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    if where == "cgroup" and PARENT is None:
        pytest.skip("needs a writable cgroup2 hierarchy")
    cg = request.getfixturevalue("cgroup_dir") if where == "cgroup" else None
    grower = spec(
        "grower", _grower(tmp_path / "ran"), memory_restart=32 << 20, memory_restart_after=0.2
    )
    async with running(grower, cgroup=cg) as (sup, _):
        pub = sup.get("grower")
        await line_with(pub, f"allocated {80 << 20}")
        first = pub.pid
        async with asyncio.timeout(10):
            await pub.wait_until(lambda: pub.pid not in (None, first) and pub.state == S.RUNNING)
        await line_with(pub, "allocated 0")
        # Two more sweeps (one a second) find the new run below the limit: no second restart.
        second = pub.pid
        async with asyncio.timeout(10):
            while pub.uptime() < 2.5 and pub.pid == second:
                await asyncio.sleep(0.1)
        assert pub.pid == second
        assert pub.exit_reasons["memory"] == 1 and pub.memory_restarts == 1
        assert pub.counters()["publisher.grower.memory_restarts"] == 1
    said = [r.getMessage() for r in caplog.records if "memory_restart" in r.getMessage()]
    assert any(" MiB above memory_restart 32.0 MiB for 0.2 s" in m for m in said), said


TICKER = py(
    "import os, sys, time\n"
    "os.fork()\n"  # two tickers: the whole tree must freeze
    "while True:\n"
    "    print('tick', os.getpid(), time.monotonic(), flush=True)\n"
    "    time.sleep(0.02)\n"
)


@needs_cgroup
async def test_pause_freezes_the_tree_and_resume_continues_it(
    cgroup_dir: Path, tmp_path: Path
) -> None:
    probes = tmp_path / "probes"
    probe = ProbeSpec(
        kind="exec", interval=0.05, timeout=0.04, command=("sh", "-c", f"echo >> {probes}")
    )
    async with running(spec("ticker", TICKER, probe=probe), cgroup=cgroup_dir) as (sup, _):
        pub = sup.get("ticker")
        await in_state(pub, S.RUNNING)
        assert pub.cgroup is not None
        await line_with(pub, "tick")
        await sup.pause("ticker")
        assert pub.state == S.PAUSED and pub.cgroup.frozen()
        tree = pub.cgroup.pids()
        assert len(tree) == 2
        for pid in tree:  # the kernel's freezer holds each task in its signal trap
            assert Path(f"/proc/{pid}/wchan").read_text() in ("get_signal", "do_freezer_trap")
        seq, probed, frozen_at = pub.output.last_seq, probes.read_text(), time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                while True:
                    await pub.output.wait_beyond(pub.output.last_seq)
        # No output while frozen: lines may still arrive that were in the pipe when the freeze
        # came (a fresh-clone run saw one), but none was written after it.
        stamps = [float(line.text.split()[2]) for line in pub.output.tail(seq, 100).lines]
        assert all(stamp < frozen_at for stamp in stamps), (stamps, frozen_at)
        assert probes.read_text() == probed  # and no probes
        with pytest.raises(InvalidState, match="only a RUNNING publisher can be paused"):
            await pub.pause()
        await sup.resume("ticker")
        assert pub.state == S.RUNNING and not pub.cgroup.frozen()
        async with asyncio.timeout(5):
            await pub.output.wait_beyond(pub.output.last_seq)
            while probes.read_text() == probed:
                await asyncio.sleep(0.02)
        # A stop of a paused publisher thaws it first: the stop signal ends it, not SIGKILL.
        await sup.pause("ticker")
        await sup.stop("ticker")
        assert pub.state == S.STOPPED and pub.last_exit == -15
        assert not pub.cgroup.populated()


async def test_pause_is_refused_without_a_cgroup() -> None:
    async with running(spec("plain"), cgroup=None) as (sup, _):
        pub = sup.get("plain")
        await in_state(pub, S.RUNNING)
        with pytest.raises(InvalidState, match="has no cgroup"):
            await sup.pause("plain")
        assert pub.state == S.RUNNING


@pytest.mark.parametrize("user", [None, "nobody"])
async def test_rlimits_are_set_for_the_child(
    user: str | None, request: pytest.FixtureRequest
) -> None:
    # Set by the preexec hook (the wrapper cannot: module docstring of spawn), before the
    # switch of user, which the second case makes.
    cg = request.getfixturevalue("cgroup_dir") if PARENT is not None else None
    limits = Limits(nofile=1000, core=0, nproc=4000, address_space=2 << 30)
    limited = spec("limited", SLEEP, limits=limits, user=user)
    async with running(limited, cgroup=cg) as (sup, _):
        pub = sup.get("limited")
        await in_state(pub, S.RUNNING)
        assert pub.pid is not None
        text = Path(f"/proc/{pub.pid}/limits").read_text()
        if cg is not None:  # both paths join the cgroup before the exec
            assert pub.cgroup is not None and pub.pid in pub.cgroup.pids()
    rows = {line[:26].strip(): line[26:].split()[:2] for line in text.splitlines()[1:]}
    assert rows["Max open files"] == ["1000", "1000"]
    assert rows["Max core file size"] == ["0", "0"]
    assert rows["Max processes"] == ["4000", "4000"]
    assert rows["Max address space"] == [str(2 << 30)] * 2


BURNER = py(
    "import os, time\n"
    "os.fork()\n"  # two processes burning CPU, each with some memory of its own
    "blob = b'y' * (20 << 20)\n"
    "print('burning', flush=True)\n"
    "while True: pass\n"
)


def _proc_figures(pids: list[int]) -> tuple[float, int]:
    ticks, rss = 0, 0
    for pid in pids:
        raw = Path(f"/proc/{pid}/stat").read_text()
        fields = raw[raw.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])
        rss += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return ticks / os.sysconf("SC_CLK_TCK"), rss


@pytest.mark.parametrize("where", ["cgroup", "proc"])
async def test_accounting_matches_proc_within_ten_percent(
    where: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if where == "cgroup" and PARENT is None:
        pytest.skip("needs a writable cgroup2 hierarchy")
    cg = request.getfixturevalue("cgroup_dir") if where == "cgroup" else None
    monkeypatch.setattr(publisher_module, "USAGE_TTL", 0.0)
    async with running(spec("burner", BURNER), cgroup=cg) as (sup, _):
        pub = sup.get("burner")
        await line_with(pub, "burning")
        assert pub.pid is not None
        pids = [pub.pid, *descendants(pub.pid)]
        async with asyncio.timeout(20):
            while _proc_figures(pids)[0] < 0.5:
                await asyncio.sleep(0.05)
        usage = pub.usage()
        cpu, rss = _proc_figures(pids)
        counters = pub.counters()
    assert usage.tasks == len(pids) == 2
    assert abs(usage.cpu_seconds - cpu) <= 0.1 * cpu, (usage, cpu)
    assert abs(usage.memory_bytes - rss) <= 0.1 * rss, (usage, rss)
    assert usage.source == ("cgroup+rss" if cg else "proc")
    assert counters["publisher.burner.tasks"] == 2
    assert abs(counters["publisher.burner.cpu_ms"] / 1000 - cpu) <= 0.1 * cpu  # read again


def test_cgroup_limits_are_written_where_the_controller_is_enabled(tmp_path: Path) -> None:
    # This kernel has no memory/cpu/pids controller in cgroup2: the files are a test directory.
    for name in ("memory.max", "memory.high", "cpu.max", "pids.max"):
        (tmp_path / name).write_text("")
    group = Cgroup(str(tmp_path), frozenset({"memory", "cpu", "pids"}))
    limits = Limits(memory_max=512 << 20, cpu_max=0.5, pids_max=100)
    assert group.apply(limits) == []
    assert (tmp_path / "memory.max").read_text() == str(512 << 20)
    assert (tmp_path / "memory.high").read_text() == "max"  # not set: the kernel's default
    assert (tmp_path / "cpu.max").read_text() == "50000 100000"
    assert (tmp_path / "pids.max").read_text() == "100"
    bare = Cgroup(str(tmp_path), frozenset({"pids"}))
    assert bare.apply(limits) == [
        f"limits.memory_max: no memory controller for {tmp_path}",
        f"limits.cpu_max: no cpu controller for {tmp_path}",
    ]


@needs_cgroup
async def test_a_limit_that_cannot_be_applied_warns_or_with_require_is_an_error(
    cgroup_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "logs").mkdir()
    cfg = tmp_path / "pubmon.toml"
    header = daemon_header(tmp_path, socket=True).replace(
        "[daemon]\n", f'[daemon]\ncgroup = "{cgroup_dir}"\n'
    )

    def write(require: bool) -> None:
        limits = {"pids_max": 50, "require": require}
        cfg.write_text(header + toml_publisher("strict", ["sleep", "3600"], limits=limits))

    write(False)  # a warning at start, and it runs
    async with run_daemon(cfg) as d:
        await d.wait_log("publisher.strict.limits.pids_max: no pids controller is enabled")
        write(True)  # a reload refuses it, naming the key; the running config stays
        done = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pubmon", "reload", "--socket", str(tmp_path / "pubmon.sock"),
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await done.communicate()
        assert done.returncode == 2 and b"publisher.strict.limits.pids_max" in err, err
        assert "strict" in d.publisher_pids()
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0
    async with run_daemon(cfg, ready=False) as d:  # at start: the daemon does not start
        assert await d.wait_exit() == 3
    assert any("publisher.strict.limits.pids_max" in line for line in d.stderr), d.stderr


@needs_cgroup
async def test_setup_kills_what_an_earlier_daemon_left_in_publisher_groups(
    cgroup_dir: Path,
) -> None:
    # A daemon killed with -9: its publishers die of their parent-death signal, an escapee
    # does not. The next daemon's setup finds it in pub-<name> and kills it.
    left, empty = cgroup_dir / "pub-old", cgroup_dir / "pub-empty"
    left.mkdir()
    empty.mkdir()
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", 'echo 0 > "$0" && exec sleep 3600', str(left / "cgroup.procs")
    )
    async with asyncio.timeout(5):
        while str(proc.pid) not in (left / "cgroup.procs").read_text().split():
            await asyncio.sleep(0.01)  # the exec chain: external state, no event to wait on
    Cgroups.setup(str(cgroup_dir))
    async with asyncio.timeout(5):
        assert await proc.wait() == -9
    assert not empty.exists()


def test_config_reads_limits_sizes_and_cgroup(tmp_path: Path) -> None:
    base = '[publisher.a]\ncommand = ["sleep", "1"]\n'
    cfg = parse_config(
        base + 'memory_restart = "512M"\nmemory_restart_after = 2\n'
        '[publisher.a.limits]\nmemory_max = "1G"\ncpu_max = 0.25\npids_max = 64\n'
        'nofile = 4096\ncore = "unlimited"\nas = 1073741824\nrequire = true\n',
        tmp_path / "p.toml",
    )
    a = cfg.publishers[0]
    assert a.memory_restart == 512 << 20 and a.memory_restart_after == 2
    assert a.limits == Limits(
        memory_max=1 << 30,
        cpu_max=0.25,
        pids_max=64,
        nofile=4096,
        core=-1,
        address_space=1 << 30,
        require=True,
    )
    assert cfg.daemon.cgroup == "auto"
    with pytest.raises(ConfigError) as bad:
        parse_config(
            '[daemon]\ncgroup = "/tmp"\n' + base + 'memory_restart = "lots"\n'
            "[publisher.a.limits]\nmemory_high = 10\nswap = 1\n",
            tmp_path / "p.toml",
        )
    said = "\n".join(map(str, bad.value.problems))
    assert "daemon.cgroup: expected" in said and "cgroup2 hierarchy" in said
    assert "publisher.a.memory_restart: expected a size" in said
    assert "publisher.a.limits.memory_high: expected a size of at least 4096" in said
    assert "publisher.a.limits.swap" in said


def test_usage_of_a_tree_counts_the_leader_and_its_descendants() -> None:
    reader = UsageReader(os.getpid(), None)
    try:
        usage = reader.usage()
    finally:
        reader.close()
    own = resource.getrusage(resource.RUSAGE_SELF)
    assert usage.tasks == 1 + len(descendants(os.getpid()))
    assert usage.memory_bytes >= own.ru_maxrss * 1024 * 0.5
    assert usage.cpu_seconds >= (own.ru_utime + own.ru_stime) * 0.9


class _Watched:
    """A publisher as the memory sweep sees it (memsweep.Watched, a seam we own): its memory
    is what the test says, its cgroup a plain directory with the memory controller's files
    (this kernel's cgroup2 has no memory controller)."""

    def __init__(self, name: str, cgroup: Cgroup, **kw: Any) -> None:
        self.name = name
        self.spec = spec(name, **kw)
        self.cgroup: Cgroup | None = cgroup
        self.pid: int | None = 4242
        self.used = 0
        self.checks = 0

    def check_memory(self, now: float) -> int | None:
        self.checks += 1
        return self.used


def _memory_dir(top: Path, name: str) -> Cgroup:
    top.joinpath(name).mkdir()
    for file, text in (("memory.events", "high 0\n"), ("memory.current", "1000"),
                       ("memory.high", "max")):  # fmt: skip
        (top / name / file).write_text(text)
    return Cgroup(str(top / name), frozenset({"memory"}))


async def test_with_the_memory_controller_a_quiet_publisher_is_not_read_until_memory_high_trips(
    tmp_path: Path,
) -> None:
    sweep = MemorySweep()
    plain = _Watched("plain", _memory_dir(tmp_path, "plain"), memory_restart=1 << 20)
    operator = _Watched(  # its own memory.high, at or below memory_restart, is the tripwire
        "operator", _memory_dir(tmp_path, "operator"), memory_restart=2 << 20,
        limits=Limits(memory_high=1 << 20),
    )  # fmt: skip
    above = _Watched(  # memory.high above memory_restart: not ours to lower, read each time
        "above", _memory_dir(tmp_path, "above"), memory_restart=1 << 20,
        limits=Limits(memory_high=4 << 20),
    )  # fmt: skip
    nocg = _Watched("nocg", plain.cgroup, memory_restart=1 << 20)  # type: ignore[arg-type]
    nocg.cgroup = None
    big = _Watched("big", _memory_dir(tmp_path, "big"), memory_restart=1 << 20)
    big.used = 2 << 20  # above already: memory.high is not written below what is in use
    pubs = [plain, operator, above, nocg, big]
    try:
        await sweep.sweep(pubs)  # arms the tripwires and reads each once
        assert [p.checks for p in pubs] == [1, 1, 1, 1, 1]
        assert (tmp_path / "plain" / "memory.high").read_text() == str(1 << 20)
        assert (tmp_path / "operator" / "memory.high").read_text() == "max"  # untouched
        assert (tmp_path / "above" / "memory.high").read_text() == "max"
        for _ in range(3):
            await sweep.sweep(pubs)
        assert [p.checks for p in pubs] == [1, 1, 4, 4, 4]  # quiet ones are not read
        assert (tmp_path / "big" / "memory.high").read_text() == "max"
        # The kernel counts a crossing of memory.high in memory.events; its change wakes us.
        (tmp_path / "plain" / "memory.events").write_text("high 1\n")
        async with asyncio.timeout(5):
            await sweep.tripped.wait()
        assert (tmp_path / "plain" / "memory.high").read_text() == "max"  # lifted at once
        plain.used = 3 << 20
        (tmp_path / "plain" / "memory.current").write_text(str(3 << 20))
        await sweep.sweep(pubs)
        await sweep.sweep(pubs)
        assert plain.checks == 3  # hot: read each sweep while above memory_restart
        plain.used = 1000
        (tmp_path / "plain" / "memory.current").write_text("1000")
        await sweep.sweep(pubs)  # below again: the tripwire is set again, quiet
        assert (tmp_path / "plain" / "memory.high").read_text() == str(1 << 20)
        await sweep.sweep(pubs)
        assert plain.checks == 4 and operator.checks == 1 and sweep.trips == 1
        plain.pid = 4243  # a new run: its spawn reset memory.high; armed again and read once
        await sweep.sweep(pubs)
        assert plain.checks == 5
        assert (tmp_path / "plain" / "memory.high").read_text() == str(1 << 20)
        # A reload that drops memory_restart takes the tripwire away.
        plain.spec = spec("plain")
        await sweep.sweep(pubs)
        assert (tmp_path / "plain" / "memory.high").read_text() == "max"
    finally:
        sweep.close()


@needs_cgroup
async def test_the_kernel_reports_a_change_of_a_cgroup_file_to_the_file_watch(
    cgroup_dir: Path,
) -> None:
    # memory.events and cgroup.events are notified alike (kernfs); this kernel has the latter.
    group = Cgroup(str(cgroup_dir), frozenset())
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", f'echo $$ > "{group.procs}" && exec sleep 3600'
    )
    watch = FileWatch()
    try:
        async with asyncio.timeout(10):
            while not group.populated():  # the child's own write, then exec
                await asyncio.sleep(0.01)
        wd = watch.add(str(cgroup_dir / "cgroup.events"))
        assert watch.read() == set()
        changed = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(watch.fd, lambda: changed.done() or
                                              changed.set_result(watch.read()))  # fmt: skip
        group.kill()
        async with asyncio.timeout(10):
            assert wd in await changed
        assert not group.populated()
    finally:
        asyncio.get_running_loop().remove_reader(watch.fd)
        watch.close()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_the_memory_read_counts_a_child_forked_since_the_last_look_within_rewalk_reads(
    request: pytest.FixtureRequest,
) -> None:
    # Without the memory controller, memory() reads the statm of the processes it knew and
    # looks at the tree again every REWALK-th read (or at once when one is gone).
    forker = py(
        "import os, sys, time\n"
        "sys.stdin.readline()\n"
        "if os.fork() == 0:\n"
        "    blob = b'x' * (60 << 20)\n"
        "    print('child', os.getpid(), flush=True)\n"
        "    time.sleep(3600)\n"
        "time.sleep(3600)\n"
    )
    cg = request.getfixturevalue("cgroup_dir") if PARENT is not None else None
    procs = None if cg is None else str(cg / "cgroup.procs")
    cmd = forker if procs is None else ("sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh",
                                        *forker)  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    group = None if cg is None else Cgroup(str(cg), frozenset())
    reader = UsageReader(proc.pid, group)
    try:
        if group is not None:
            async with asyncio.timeout(10):
                while proc.pid not in group.pids():
                    await asyncio.sleep(0.01)
        before = reader.memory()
        assert 0 < before < 40 << 20
        proc.stdin.write(b"go\n")
        async with asyncio.timeout(10):
            child = int((await proc.stdout.readline()).split()[1])
        seen = [reader.memory() for _ in range(usage_module.REWALK)]
        assert max(seen) >= before + (60 << 20) * 0.9, seen
        os.kill(child, signal.SIGKILL)  # a process gone: the next read looks again at once
        async with asyncio.timeout(10):
            while alive(child):
                await asyncio.sleep(0.01)
        assert reader.memory() < 40 << 20
    finally:
        reader.close()
        proc.kill()
        await proc.wait()


class _Source:
    """The daemon as metrics.MetricsSource (a seam we own): only its publishers matter here."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def publishers(self) -> Mapping[str, Publisher]:
        return self.sup.publishers

    def daemon_values(self) -> DaemonValues:
        return DaemonValues(reloads=0, reload_failures=0, loop_lag_ms=0, ready=True, rpc={})

    def denied(self) -> Mapping[tuple[str, str], int]:
        return {}

    def child_counters(self) -> Mapping[str, Mapping[str, float]]:
        return {}


def _samples(text: str, name: str) -> dict[str, float]:
    """publisher -> value of metric `name` in an exposition."""
    return {
        s.labels["publisher"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


@pytest.mark.parametrize("where", ["cgroup", "proc"])
async def test_metrics_give_the_accounting_of_the_whole_tree(
    where: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a cgroup, /metrics counts the setsid'd escapee (the walk from the leader cannot).
    if where == "cgroup" and PARENT is None:
        pytest.skip("needs a writable cgroup2 hierarchy")
    cg = request.getfixturevalue("cgroup_dir") if where == "cgroup" else None
    monkeypatch.setattr(publisher_module, "USAGE_TTL", 0.0)
    async with running(spec("feed", DOUBLE_FORK), spec("burner", BURNER), cgroup=cg) as (sup, _):
        feed, burner = sup.get("feed"), sup.get("burner")
        escapee = int((await line_with(feed, "escapee")).split()[1])
        await line_with(burner, "burning")
        assert burner.pid is not None and feed.pid is not None
        burners = [burner.pid, *descendants(burner.pid)]
        async with asyncio.timeout(20):
            while _proc_figures(burners)[0] < 0.3:
                await asyncio.sleep(0.05)
        procstats = ProcStats(min_interval=0)
        await procstats.refresh({n: p.pid for n, p in sup.publishers.items()})
        text = (await MetricsWriter(_Source(sup), procstats).render()).decode()
        cpu, rss = _proc_figures(burners)
        feed_rss = _proc_figures([feed.pid, escapee])[1]
    processes = _samples(text, "pubmon_publisher_processes")
    memory = _samples(text, "pubmon_publisher_resident_memory_bytes")
    seconds = _samples(text, "pubmon_publisher_cpu_seconds_total")
    assert processes["burner"] == 2
    assert abs(seconds["burner"] - cpu) <= 0.1 * cpu, (seconds, cpu)
    assert abs(memory["burner"] - rss) <= 0.1 * rss, (memory, rss)
    if cg:  # the leader and the escapee (the walk finds the leader and its zombie child)
        assert processes["feed"] == 2
        assert abs(memory["feed"] - feed_rss) <= 0.1 * feed_rss, (memory, feed_rss)
    assert set(_samples(text, "pubmon_publisher_open_fds")) == {"feed", "burner"}


def test_release_turns_off_only_the_controllers_setup_enabled_before_moving_back(
    tmp_path: Path,
) -> None:
    # cgroup2 refuses a process in a group whose subtree_control hands out a domain controller:
    # the controllers go first, then the daemon, then its leaf. (A plain directory: this
    # kernel's cgroup2 has no controller to turn off; the move back itself runs in
    # test_the_daemon_moves_into_a_leaf_of_the_cgroup_it_is_in.)
    for name in ("cgroup.subtree_control", "cgroup.procs"):
        (tmp_path / name).write_text("")
    (tmp_path / "supervisor").mkdir()
    (tmp_path / "pub-feed").mkdir()
    groups = Cgroups(str(tmp_path), frozenset({"memory", "pids"}))
    groups.moved, groups.enabled = True, frozenset({"memory"})  # pids was on before setup
    assert groups.release() == []
    assert (tmp_path / "cgroup.subtree_control").read_text() == "-memory"
    assert (tmp_path / "cgroup.procs").read_text() == str(os.getpid())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cgroup.procs", "cgroup.subtree_control"]
    assert groups.release() == []  # once is enough: it did not move again


async def test_metrics_give_the_limit_hits_of_a_cgroup_with_the_controllers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This kernel's cgroup2 has no memory/pids/cpu controller: the groups are plain directories
    # with the controllers' files; one publisher has all three, one none of them.
    files = {
        "memory.events": "low 0\nhigh 7\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n",
        "pids.events": "max 3\n",
        "cpu.stat": "usage_usec 10\nnr_periods 5\nnr_throttled 2\nthrottled_usec 1500000\n",
    }
    (tmp_path / "pub-capped").mkdir()
    for name, text in files.items():
        (tmp_path / "pub-capped" / name).write_text(text)
    capped = Cgroups(str(tmp_path), frozenset({"memory", "pids", "cpu"}))
    assert capped.publisher("capped").limit_events() == {
        "memory.events:high": 7,
        "memory.events:max": 2,
        "memory.events:oom_kill": 1,
        "pids.events:max": 3,
        "cpu.stat:throttled_usec": 1500000,
    }
    cfg = config(spec("capped", autostart=False), spec("bare", autostart=False))
    async with supervising(cfg, cgroups=capped) as sup:
        sup.get("bare").cgroup = Cgroup(str(tmp_path / "pub-bare"), frozenset())
        writer = MetricsWriter(_Source(sup), ProcStats())
        text = (await writer.render()).decode()
        events = files["memory.events"].replace("oom_kill 1", "oom_kill 2")
        (tmp_path / "pub-capped" / "memory.events").write_text(events)
        monkeypatch.setattr(metrics_module, "LIMITS_TTL", 0.0)  # read again at once
        again = (await writer.render()).decode()
        for name in files:
            (tmp_path / "pub-capped" / name).unlink()  # the supervisor rmdirs it at exit
    assert _samples(text, "pubmon_publisher_memory_high_events_total") == {"capped": 7}
    assert _samples(text, "pubmon_publisher_memory_max_events_total") == {"capped": 2}
    assert _samples(text, "pubmon_publisher_oom_kills_total") == {"capped": 1}
    assert _samples(text, "pubmon_publisher_pids_max_events_total") == {"capped": 3}
    assert _samples(text, "pubmon_publisher_cpu_throttled_seconds_total") == {"capped": 1.5}
    assert _samples(again, "pubmon_publisher_oom_kills_total") == {"capped": 2}


# A daemonizing program whose setsid'd grandchild does the work: it holds 60 MiB and burns CPU.
HEAVY_ESCAPEE = py(
    "import os, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        blob = b'z' * (60 << 20)\n"
    "        print('escapee', os.getpid(), flush=True)\n"
    "        while True: pass\n"
    "    os._exit(0)\n"
    "time.sleep(3600)\n"
)


class _Daemon:
    """The daemon as service.handler.DaemonControl (a seam we own): what the calls read."""

    def __init__(self, sup: Supervisor, procstats: ProcStats) -> None:
        self.supervisor = sup
        self.procstats = procstats


@needs_cgroup
async def test_get_publisher_and_the_dashboard_count_the_setsid_escapee_of_a_cgroup(
    cgroup_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # getPublisher and the dashboard's rows take the figures /metrics and status take (the
    # cgroup's): the walk from the leader would miss the escapee, its memory and its CPU.
    monkeypatch.setattr(publisher_module, "USAGE_TTL", 0.0)
    async with running(spec("feed", HEAVY_ESCAPEE), cgroup=cgroup_dir) as (sup, _):
        feed = sup.get("feed")
        escapee = int((await line_with(feed, "escapee")).split()[1])
        assert feed.pid is not None and escapee not in [feed.pid, *descendants(feed.pid)]
        async with asyncio.timeout(20):
            while _proc_figures([escapee])[0] < 0.3:
                await asyncio.sleep(0.05)
        procstats = ProcStats(min_interval=0)
        await procstats.refresh({"feed": feed.pid})
        walk = procstats.figures["feed"]
        handler = PubmonHandler(cast(Any, _Daemon(sup, procstats)), dict)
        info = handler.getPublisher("feed")
        bound = idl.bind(idl.pubmon().PubmonService)  # listPublishers answers encoded rows
        method = bound.method("listPublishers")
        reply = bound.encode_reply(method, 1, "success", handler.listPublishers())
        (listed,) = bound.decode_reply(reply[4:], method, 1)  # without the frame length
        row = _row(feed, procstats)
        cpu, rss = _proc_figures([escapee])
    assert walk.rss_bytes < 60 << 20 and walk.cpu_seconds < 0.3  # the walk misses it
    for memory, seconds in (
        (info.memoryBytes, info.cpuSeconds),
        (listed.memoryBytes, listed.cpuSeconds),
        (row["rss"], row["cpu"]),
    ):
        assert isinstance(memory, int) and isinstance(seconds, float)
        assert memory >= rss >= 60 << 20, (memory, rss)
        assert seconds >= 0.3, (seconds, cpu)
    assert info.openFds == row["fds"] == walk.open_fds


async def test_a_run_the_oom_killer_ended_counts_as_memory_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # This kernel's cgroup2 has no memory controller, so no OOM kill is counted in a real
    # memory.events: the groups are plain directories standing in, with memory.events as the
    # kernel writes it. A SIGKILL with oom_kill gone up during the run is "memory"; a SIGKILL
    # without is "signal".
    (tmp_path / "pub-victim").mkdir()
    events = tmp_path / "pub-victim" / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 3\noom_group_kill 0\n")
    (tmp_path / "pub-victim" / "cpu.stat").write_text("usage_usec 0\n")
    groups = Cgroups(str(tmp_path), frozenset({"memory"}))
    async with supervising(config(spec("victim", restart="never")), cgroups=groups) as sup:
        victim = sup.get("victim")
        await in_state(victim, S.RUNNING)
        assert victim.pid is not None
        events.write_text(events.read_text().replace("oom_kill 3", "oom_kill 4"))
        os.kill(victim.pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            await victim.wait_until(lambda: victim.exits == 1)
        assert victim.exit_reasons["memory"] == 1 and victim.exit_reasons["signal"] == 0
        await sup.start("victim")
        await in_state(victim, S.RUNNING)
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)  # oom_kill stays at 4: not the OOM killer
        async with asyncio.timeout(10):
            await victim.wait_until(lambda: victim.exits == 2)
        assert victim.exit_reasons["memory"] == 1 and victim.exit_reasons["signal"] == 1
        for path in (tmp_path / "pub-victim").iterdir():
            path.unlink()  # the supervisor rmdirs it at exit
    ooms = [r.getMessage() for r in caplog.records if "OOM killer" in r.getMessage()]
    assert len(ooms) == 1 and "victim" in ooms[0] and "oom_kill 4" in ooms[0], ooms
