"""Field-level readers and checks for config.py: a parsed TOML value in, a typed value or a
problem out.

A `Checker` reads values out of the dicts `tomllib` returns and records every problem it meets
instead of raising, so one pass over a file reports all of them. Every getter returns the
default when the key is absent *or* invalid; callers that combine fields ask `checker.failed(key)`
first, so one bad value does not also produce follow-on complaints about the fields it feeds.

Keys are tuples of TOML key parts (`("publisher", "feed", "port")`); `dotted()` spells them the
way TOML would (`publisher.feed.port`, `publisher."a.b".port`).
"""

from __future__ import annotations

__all__ = [
    "Checker",
    "Key",
    "Table",
    "check_depends",
    "dotted",
    "expand_environment",
    "expand_placeholders",
    "find_cycles",
    "find_program",
    "is_local",
    "parse_listen",
    "parse_signal",
]

import datetime
import difflib
import ipaddress
import math
import os
import re
import shlex
import shutil
import signal
import string
from collections.abc import Collection, Mapping
from typing import TypeVar

from pubmon.errors import ConfigProblem

Key = tuple[str, ...]
Table = Mapping[str, object]
_D = TypeVar("_D", int, None)

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PLACEHOLDERS = ("port", "name", "index")


def dotted(key: Key) -> str:
    """`("publisher", "a.b", "port")` -> `publisher."a.b".port`, as the key is written in TOML."""
    parts = []
    for part in key:
        if _BARE_KEY.fullmatch(part):
            parts.append(part)
        else:
            escaped = part.replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'"{escaped}"')
    return ".".join(parts)


def describe(value: object) -> str:
    """A TOML-flavoured description of a parsed value, for "expected X, got Y" messages."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"string {shown!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return f"date/time {value.isoformat()}"
    return type(value).__name__  # pragma: no cover - tomllib produces nothing else


def _bounds(lo: float | None, hi: float | None) -> str:
    """The range part of an "expected ..." message: ' in 1..65535', ' >= 0' or ''."""
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    return f" <= {hi}" if hi is not None else ""


class Checker:
    """Collects the problems of one file while its values are read. See the module docstring."""

    def __init__(self) -> None:
        self.problems: list[tuple[Key, str]] = []
        self.settled: set[Key] = set()  # keys whose value is known bad: no follow-on problems

    def problem(self, key: Key, why: str) -> None:
        """Record a problem; the same (key, why) twice is kept once (instances share templates)."""
        if key not in self.settled and (key, why) not in self.problems:
            self.problems.append((key, why))

    def failed(self, *keys: Key) -> bool:
        """True if a problem was recorded for any of `keys` or anything under them."""
        return any(k[: len(key)] == key for key in keys for k, _ in self.problems)

    def in_file_order(self, doc: Table) -> list[ConfigProblem]:
        """The problems sorted by where their key is in the file, with keys spelled dotted.

        tomllib keeps keys in the order it met them, so walking the document numbers keys in
        file order (a table reopened by a later sub-table header sorts with its first part). A
        problem about an absent key (a required key, a default in conflict) sorts right after
        the subtree of its nearest present ancestor; ties keep the order they were found in.
        """
        spans: dict[Key, tuple[int, int]] = {}

        def walk(table: Table, prefix: Key, n: int) -> int:
            for name, value in table.items():
                start, n = n, n + 1
                if isinstance(value, dict):
                    n = walk(value, (*prefix, name), n)
                spans[(*prefix, name)] = (start, n)
            return n

        walk(doc, (), 0)

        def position(key: Key) -> tuple[int, int]:
            for depth in range(len(key), 0, -1):
                if key[:depth] in spans:
                    start, end = spans[key[:depth]]
                    return (start, 1) if depth == len(key) else (end, 0)
            return (0, 0)

        ordered = sorted(self.problems, key=lambda p: position(p[0]))
        return [ConfigProblem(dotted(key), why) for key, why in ordered]

    def expand(
        self, argv: tuple[str, ...], values: Mapping[str, object], key: Key
    ) -> tuple[str, ...] | None:
        """`expand_placeholders` over an argv; None (and a problem) if any argument fails."""
        try:
            return tuple(expand_placeholders(arg, values) for arg in argv)
        except ValueError as e:
            self.problem(key, str(e))
            return None

    # --- tables -----------------------------------------------------------------------------

    def table(self, parent: Table, name: str, key: Key) -> Table | None:
        """The sub-table `name` of `parent`: {} when absent, None (and a problem) if not a table."""
        value = parent.get(name, {})
        if isinstance(value, dict):
            return value
        self.problem(key, f"expected a table, got {describe(value)}")
        return None

    def known_keys(self, table: Table, key: Key, allowed: Collection[str]) -> None:
        """Report every key of `table` not in `allowed`, with a spelling hint when one is close."""
        for name in table:
            if name in allowed:
                continue
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.problem((*key, name), f"unknown key{hint}")

    # --- scalars ----------------------------------------------------------------------------

    def number(
        self,
        table: Table,
        name: str,
        key: Key,
        default: float,
        *,
        gt: float | None = None,
        ge: float | None = None,
        le: float | None = None,
    ) -> float:
        """A finite float; TOML integers are accepted, booleans are not (true is not 1)."""
        if name not in table:
            return default
        value = table[name]
        key = (*key, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(key, f"expected a number, got {describe(value)}")
            return default
        if not math.isfinite(value):
            self.problem(key, f"expected a finite number, got {describe(value)}")
            return default
        too_low = (gt is not None and value <= gt) or (ge is not None and value < ge)
        if too_low or (le is not None and value > le):
            if gt is not None:
                limits = f" > {gt}" + (f" and <= {le}" if le is not None else "")
            else:
                limits = _bounds(ge, le)
            self.problem(key, f"expected a number{limits}, got {value}")
            return default
        return float(value)

    def integer(
        self, table: Table, name: str, key: Key, default: _D, *, lo: int, hi: int | None = None
    ) -> int | _D:
        """An integer in lo..hi; floats (even 2.0) and booleans are type errors."""
        if name not in table:
            return default
        got = self.int_value(table[name], (*key, name), lo=lo, hi=hi)
        return default if got is None else got

    def int_value(
        self, value: object, key: Key, *, lo: int, hi: int | None = None, where: str = ""
    ) -> int | None:
        """Check one integer; `where` prefixes the message (e.g. "item 2: ")."""
        if isinstance(value, bool) or not isinstance(value, int):
            got = describe(value)
            self.problem(key, f"{where}expected an integer{_bounds(lo, hi)}, got {got}")
            return None
        if value < lo or (hi is not None and value > hi):
            self.problem(key, f"{where}expected an integer{_bounds(lo, hi)}, got {value}")
            return None
        return value

    def boolean(self, table: Table, name: str, key: Key, default: bool) -> bool:
        """true or false; TOML has no truthy strings or numbers."""
        if name not in table:
            return default
        value = table[name]
        if isinstance(value, bool):
            return value
        self.problem((*key, name), f"expected true or false, got {describe(value)}")
        return default

    def string(self, table: Table, name: str, key: Key, *, nonempty: bool = False) -> str | None:
        """A string without NUL bytes (they cannot reach exec or a path); None when absent."""
        if name not in table:
            return None
        return self.str_value(table[name], (*key, name), nonempty=nonempty)

    def str_value(
        self, value: object, key: Key, *, nonempty: bool = False, where: str = ""
    ) -> str | None:
        """Check one string; `where` prefixes the message (e.g. "item 2: ")."""
        if not isinstance(value, str):
            kind = "a non-empty string" if nonempty else "a string"
            self.problem(key, f"{where}expected {kind}, got {describe(value)}")
            return None
        if nonempty and not value:
            self.problem(key, f"{where}expected a non-empty string, got ''")
            return None
        if "\0" in value:
            self.problem(key, f"{where}expected a string without NUL characters")
            return None
        return value

    def choice(self, table: Table, name: str, key: Key, options: tuple[str, ...]) -> str | None:
        """One of `options`; None when absent or invalid."""
        if name not in table:
            return None
        value = table[name]
        if isinstance(value, str) and value in options:
            return value
        listed = " | ".join(repr(o) for o in options)
        self.problem((*key, name), f"expected one of {listed}, got {describe(value)}")
        return None

    # --- arrays -----------------------------------------------------------------------------

    def array(self, table: Table, name: str, key: Key, what: str) -> list[object] | None:
        """The raw list under `name`; None when absent or not an array."""
        if name not in table:
            return None
        value = table[name]
        if isinstance(value, list):
            return value
        self.problem((*key, name), f"expected an array of {what}, got {describe(value)}")
        return None

    def int_list(
        self, table: Table, name: str, key: Key, *, lo: int, hi: int
    ) -> tuple[int, ...] | None:
        """A list of integers in lo..hi; None when absent or when any item is bad."""
        items = self.array(table, name, key, "integers")
        if items is None:
            return None
        got = [
            self.int_value(v, (*key, name), lo=lo, hi=hi, where=f"item {i + 1}: ")
            for i, v in enumerate(items)
        ]
        ints = [v for v in got if v is not None]
        return tuple(ints) if len(ints) == len(items) else None

    def str_list(self, table: Table, name: str, key: Key) -> tuple[str, ...] | None:
        """A list of strings; None when absent or when any item is bad."""
        items = self.array(table, name, key, "strings")
        if items is None:
            return None
        return self._strings(items, (*key, name))

    def _strings(self, items: list[object], key: Key) -> tuple[str, ...] | None:
        got = [self.str_value(v, key, where=f"item {i + 1}: ") for i, v in enumerate(items)]
        strs = [v for v in got if v is not None]
        return tuple(strs) if len(strs) == len(items) else None

    def command(self, table: Table, name: str, key: Key) -> tuple[str, ...] | None:
        """A non-empty argv: an array of strings, or one string split like a shell would (shlex).

        None when absent or invalid. Placeholders are left for `expand_placeholders`.
        """
        if name not in table:
            return None
        value = table[name]
        key = (*key, name)
        argv: tuple[str, ...] | None
        if isinstance(value, str):
            try:
                argv = tuple(shlex.split(value))
            except ValueError as e:  # "No closing quotation", "No escaped character"
                self.problem(key, f"cannot split the command string: {e}")
                return None
            if "\0" in value:
                self.problem(key, "expected a string without NUL characters")
                return None
        elif isinstance(value, list):
            argv = self._strings(value, key)
            if argv is None:
                return None
        else:
            self.problem(key, f"expected an array of strings or a string, got {describe(value)}")
            return None
        if not argv or not argv[0]:
            self.problem(key, "expected a non-empty command (the program first)")
            return None
        return argv


# ${NAME} or ${NAME:-default}; $${...} is a literal "${...}". Anything else with a "$" is left
# alone: "$HOME" for a shell, "${{x}}" (a literal "${x}" once {placeholders} are expanded).
_ENV_REF = re.compile(r"\$(\$)?\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_environment(doc: Table, chk: Checker, environ: Mapping[str, str]) -> dict[str, object]:
    """A copy of a parsed document with `${VAR}` / `${VAR:-default}` expanded in every string
    value (arrays included; keys and table names are not). An unset variable with no default
    is a problem at the key of the value; the reference is then left as written."""

    def one(text: str, key: Key) -> str:
        if "${" not in text:
            return text

        def sub(m: re.Match[str]) -> str:
            escaped, name, default = m.groups()
            if escaped:
                return m.group(0)[1:]
            value = environ.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    chk.problem(key, f"${{{name}}}: environment variable {name} is not set "
                                "(write ${" + name + ":-default} for a default)")  # fmt: skip
                    chk.settled.add(key)  # the reference stays as written: say nothing more
                    return m.group(0)
                return default
            return value

        return _ENV_REF.sub(sub, text)

    def walk(value: object, key: Key) -> object:
        if isinstance(value, str):
            return one(value, key)
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if isinstance(value, dict):
            return {k: walk(v, (*key, k)) for k, v in value.items()}
        return value

    out = walk(doc, ())
    assert isinstance(out, dict)
    return out


def expand_placeholders(arg: str, values: Mapping[str, object]) -> str:
    """Expand `{port}`, `{name}`, `{index}` in one argument, str.format style.

    Only those three names are allowed (a format spec such as `{index:02d}` is fine); `{{` and
    `}}` are literal braces. Any other field, or a malformed string, raises ValueError with a
    message fit for a ConfigProblem. `values` may lack "port" (no port set): using it then fails.
    """
    try:
        fields = list(string.Formatter().parse(arg))
    except ValueError as e:  # "Single '}' encountered in format string"
        raise ValueError(f"{arg!r}: {e} (write {{{{ and }}}} for literal braces)") from None
    for _literal, field, spec, _conversion in fields:
        if field is None:
            continue
        if field not in _PLACEHOLDERS or (spec and "{" in spec):
            shown = "{" + field + (":" + spec if spec else "") + "}"
            raise ValueError(
                f"{arg!r}: unknown placeholder {shown} (allowed: {{port}}, {{name}}, {{index}};"
                " write {{ and }} for literal braces)"
            )
        if field not in values:
            raise ValueError(f"{arg!r} uses {{{field}}} but the publisher has no {field} set")
    try:
        return arg.format_map(values)
    except (ValueError, TypeError) as e:  # a format spec that does not fit: {name:d}
        raise ValueError(f"{arg!r}: {e}") from None


def parse_listen(text: str) -> tuple[str, int]:
    """Split a listen address, "host:port" or "[v6addr]:port", into (host, port).

    The port may be 0 (any free port). Raises ValueError saying what was expected.
    """
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f'expected "[ipv6]:port", got {text!r}')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f'expected "host:port" or "", got {text!r}')
        if ":" in host:
            raise ValueError(f'IPv6 addresses go in brackets: "[{host}]:{port}"')
        if any(c.isspace() for c in host):
            raise ValueError(f"host {host!r} contains whitespace")
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"expected a port in 0..65535, got {port!r}")
    return host, int(port)


def parse_signal(value: object) -> signal.Signals:
    """Look up a signal by name, case-insensitive, with or without "SIG": "term" -> SIGTERM.

    Raises ValueError saying what was expected (numbers are not accepted).
    """
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        # Signals.__members__ includes aliases (SIGCLD, SIGIOT); SIG_DFL/SIG_IGN are not in it.
        member = signal.Signals.__members__.get(name)
        if member is not None:
            return member
    raise ValueError(f"expected a signal name like 'TERM' or 'SIGHUP', got {describe(value)}")


def find_program(
    chk: Checker, argv: tuple[str, ...], cwd: str | None, env_path: str | None, key: Key
) -> tuple[str, ...]:
    """Check that argv[0] can be found the way exec will find it; return argv to store.

    With a "/", argv[0] must exist relative to `cwd` (the publisher's directory, else the config
    file's folder; None = unknown, skip) and is returned absolute, so spawning does not depend on
    the daemon's cwd. A file that exists but is not executable is a runtime failure, not a load
    error. Without a "/", it must be on the daemon's PATH or the publisher's own PATH (`env_path`).
    """
    prog = argv[0]
    if "/" in prog:
        if cwd is None and not os.path.isabs(prog):
            return argv
        full = os.path.normpath(os.path.join(cwd or "/", prog))
        if not os.path.exists(full):
            chk.problem(key, f"executable {prog!r} not found (no file {full})")
        elif os.path.isdir(full):
            chk.problem(key, f"executable {prog!r} is a directory ({full})")
        return (full, *argv[1:])
    search = os.pathsep.join(p for p in (env_path, os.environ.get("PATH", os.defpath)) if p)
    if shutil.which(prog, path=search) is None:
        chk.problem(key, f"executable {prog!r} not found on PATH")
    return argv


def check_depends(
    chk: Checker, depends: Mapping[str, tuple[str, ...]], sections: Collection[str]
) -> None:
    """`depends` maps each valid publisher section to its depends_on, in file order. Names that
    are not sections, a publisher depending on itself, and cycles (a -> b -> a) are problems."""
    graph: dict[str, list[str]] = {}
    for name, deps in depends.items():
        key = ("publisher", name, "depends_on")
        graph[name] = []
        for dep in deps:
            if dep == name:
                chk.problem(key, f"{dep!r} cannot depend on itself")
            elif dep in depends:
                graph[name].append(dep)
            elif dep not in sections:  # an invalid section is reported where it is defined
                hint = ""
                if dep.partition(":")[0] in sections:
                    hint = " (name the [publisher.NAME] section, not an instance)"
                chk.problem(key, f"unknown publisher {dep!r}{hint}")
    for cycle in find_cycles(graph):
        chk.problem(
            ("publisher", cycle[0], "depends_on"), "dependency cycle: " + " -> ".join(cycle)
        )


def find_cycles(graph: Mapping[str, list[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets, as [a, b, a], rotated to start at the node that
    comes first in `graph`. Iterative, so a long chain cannot hit the recursion limit."""
    order = {name: i for i, name in enumerate(graph)}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []
    for root in graph:
        if root in state:
            continue
        path, todo = [root], [iter(graph[root])]
        state[root] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(graph[nxt]))
            elif state[nxt] == 1:
                loop = path[path.index(nxt) :]
                first = min(range(len(loop)), key=lambda i: order[loop[i]])
                loop = [*loop[first:], *loop[:first], loop[first]]
                if loop not in cycles:
                    cycles.append(loop)
    return cycles


def is_local(host: str) -> bool:
    """True for hosts that reach this machine: localhost, loopback and unspecified addresses."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified
