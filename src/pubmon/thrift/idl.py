"""The three IDL modules (fb303, publisher, pubmon), loaded once per process.

``fb303()``, ``publisher()`` and ``pubmon()`` return thriftpy2 modules registered in
``sys.modules`` as ``fb303_thrift``, ``publisher_thrift`` and ``pubmon_thrift`` (so their
objects pickle), sharing one fb303 module: ``pubmon().fb303 is publisher().fb303 is fb303()``.
The first call loads all three; later calls are a dict lookup. Load them only through this
module: a separate ``thriftpy2.load`` of the same files would make a second set of classes.

The ``.thrift`` files come from package data (``pubmon/idl``, put there by the wheel's
force-include) or, in an editable checkout, from the repository's top-level ``idl/``. For a
normal install ``importlib.resources.files("pubmon") / "idl"`` is just the directory next to this
file, so that is looked up directly (importing ``importlib.resources`` costs ~15 ms of CLI start);
``importlib.resources`` is asked only when neither directory exists (a zip import).

The daemon needs these modules (its handlers build thriftpy2's classes; ``bind`` hands them to
``codec``); the CLI does not (it runs on the generated ``schema``). thriftpy2's parser rebuilds
its LALR tables on every parse: ~100 ms for these files. That time is part of the daemon's
start and so of the pause of ``pubmon upgrade`` (bench_upgrade.py: from the old image's last
read to the new image's READY=1, median 326-383 ms with 200 publishers). Measured for issue 11
(12 runs each, CPU time of importing the daemon and loading the IDL): 437 ms median without
the cache, 352 ms with it. So the parsed modules are cached as a pickle in
``$XDG_CACHE_HOME/pubmon`` (default ``~/.cache/pubmon``), keyed by the files' contents, the
thriftpy2 version and the Python version, one per IDL directory. A cache that is not ours
(wrong owner, writable by others) is ignored, since unpickling runs code; an unwritable cache
dir just means no cache.
"""

from __future__ import annotations

__all__ = ["FbStatus", "bind", "fb303", "publisher", "pubmon"]

import contextlib
import enum
import functools
import hashlib
import logging
import os
import pickle
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pubmon.thrift.codec import Service

logger = logging.getLogger(__name__)

# fb303 first: it is loaded under its final module name, so the other two find it cached.
_FILES = ("fb303.thrift", "publisher.thrift", "pubmon.thrift")
_NAMES = tuple(f"{Path(f).stem}_thrift" for f in _FILES)  # module names must end in _thrift
_CACHE_FORMAT = "1"


class FbStatus(enum.IntEnum):
    """Mirror of the IDL's ``fb_status`` for typed code; travels as the same i32."""

    DEAD = 0
    STARTING = 1
    ALIVE = 2
    STOPPING = 3
    STOPPED = 4
    WARNING = 5


def fb303() -> types.ModuleType:
    """``fb303_thrift``: ``fb_status`` and ``FacebookService``."""
    return _modules()[_NAMES[0]]


def publisher() -> types.ModuleType:
    """``publisher_thrift``: ``PublisherService`` (what a supervised publisher serves)."""
    return _modules()[_NAMES[1]]


def pubmon() -> types.ModuleType:
    """``pubmon_thrift``: ``PubmonService``, its structs and exceptions (the daemon's API)."""
    return _modules()[_NAMES[2]]


@functools.cache
def bind(service: type | str) -> Service:
    """The codec's ``Service`` for a service of the IDL (its thriftpy2 class, or its name),
    bound to thriftpy2's generated classes: what the daemon's handlers build and raise, and
    what the async client returns and raises."""
    from pubmon.thrift.codec import Service

    name = service if isinstance(service, str) else service.__name__
    return Service(name, _classes().__getitem__)


@functools.cache
def _classes() -> dict[str, type]:
    table: dict[str, type] = {}
    for module in _modules().values():
        meta = module.__thrift_meta__
        for cls in (*meta.get("structs", ()), *meta.get("exceptions", ())):
            table[cls.__name__] = cls
    return table


@functools.cache
def _modules() -> dict[str, types.ModuleType]:
    with _idl_directory() as directory:
        sources = [(name, (directory / name).read_bytes()) for name in _FILES]
        cache = _cache_file(directory, sources)
        modules = _read_cache(cache) if cache else None
        if modules is None:
            modules = _parse(directory)
            if cache:
                _write_cache(cache, modules)
    sys.modules.update(modules)
    return modules


@contextlib.contextmanager
def _idl_directory() -> Iterator[Path]:
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "idl", here.parents[3] / "idl"):  # wheel, then checkout
        if (candidate / _FILES[-1]).is_file():
            yield candidate
            return
    import importlib.resources
    import tempfile

    packaged = importlib.resources.files("pubmon") / "idl"
    # A zip import: thriftpy2 resolves `include` only between real files, so copy them all.
    with tempfile.TemporaryDirectory(prefix="pubmon-idl-") as tmp:
        for name in _FILES:
            (Path(tmp) / name).write_bytes((packaged / name).read_bytes())
        yield Path(tmp)


def _parse(directory: Path) -> dict[str, types.ModuleType]:
    import thriftpy2

    return {
        name: thriftpy2.load(str(directory / f), module_name=name, include_dirs=[str(directory)])
        for name, f in zip(_NAMES, _FILES, strict=True)
    }


def _cache_file(directory: Path, sources: list[tuple[str, bytes]]) -> Path | None:
    from thriftpy2 import __version__ as thriftpy2_version

    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, empty or relative: the XDG default
        try:
            base = os.path.join(Path.home(), ".cache")
        except RuntimeError:  # no HOME and no passwd entry: run without a cache
            return None
    digest = hashlib.sha256()
    for part in (_CACHE_FORMAT, thriftpy2_version, sys.version, str(directory)):
        digest.update(part.encode() + b"\0")
    for name, data in sources:
        digest.update(name.encode() + b"\0" + data + b"\0")
    where = hashlib.sha256(str(directory).encode()).hexdigest()[:8]
    # <where>-idl-*, not idl-<where>-*: versions before this one removed every idl-*.pickle.
    return Path(base) / "pubmon" / f"{where}-idl-{digest.hexdigest()[:32]}.pickle"


def _ours(st: os.stat_result) -> bool:
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _read_cache(path: Path) -> dict[str, types.ModuleType] | None:
    try:
        if not _ours(os.stat(path.parent)):
            logger.debug("ignoring IDL cache dir %s: not ours or writable by others", path.parent)
            return None
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
            if not _ours(os.fstat(f.fileno())):
                return None
            modules = pickle.load(f)
        if not isinstance(modules, dict) or sorted(modules) != sorted(_NAMES):
            return None
        return modules
    except FileNotFoundError:
        return None
    except Exception as e:  # a corrupt or stale cache is only a missed speed-up
        logger.debug("ignoring IDL cache %s: %r", path, e)
        return None


def _write_cache(path: Path, modules: dict[str, types.ModuleType]) -> None:
    import tempfile

    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".idl-", delete=False) as f:
            try:
                _ModulePickler(f, modules.values()).dump(modules)
            except BaseException:
                os.unlink(f.name)
                raise
        os.replace(f.name, path)
        # Stale entries of the same IDL directory go; another checkout's stay (each install
        # evicting the others' made every daemon start of two trees in turn parse, ~45 ms).
        where = path.name.partition("-idl-")[0]  # the IDL directory's hash
        for old in path.parent.glob(f"{where}-idl-*.pickle"):
            if old != path:
                old.unlink(missing_ok=True)
    except Exception as e:
        logger.debug("cannot write IDL cache %s: %r", path, e)


class _ModulePickler(pickle.Pickler):
    """Pickles our thrift modules and their generated classes *by value*.

    Plain pickle stores classes by reference (``pubmon_thrift.PublisherInfo``), and loading that
    would need the parser again. So modules and classes defined in them are rebuilt from their
    attributes; generated ``__init__`` functions are regenerated with thriftpy2's ``gen_init``.
    Everything else (``TPayload``, ``TException``) still goes by reference.
    """

    def __init__(self, file: Any, modules: Any) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._module_ids = {id(m) for m in modules}
        self._module_names = {getattr(m, "__thrift_module_name__", m.__name__) for m in modules}

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.ModuleType) and id(obj) in self._module_ids:
            return _new_module, (obj.__name__,), dict(vars(obj)), None, None, _set_state
        if isinstance(obj, type) and obj.__module__ in self._module_names:
            skip = {"__dict__", "__weakref__", "__init__"}
            state = {k: v for k, v in vars(obj).items() if k not in skip}
            args = (obj.__name__, obj.__bases__, obj.__module__)
            return _new_class, args, state, None, None, _set_state
        return NotImplemented


def _new_module(name: str) -> types.ModuleType:
    return types.ModuleType(name)


def _new_class(name: str, bases: tuple[type, ...], module: str) -> type:
    # Same call as thriftpy2's parser: `type` picks TPayloadMeta from the bases.
    return type(name, bases, {"__module__": module})


def _set_state(obj: Any, state: dict[str, Any]) -> None:
    from thriftpy2.thrift import TPayload, gen_init

    for key, value in state.items():
        setattr(obj, key, value)
    if isinstance(obj, type) and issubclass(obj, TPayload) and "default_spec" in state:
        gen_init(obj, default_spec=state["default_spec"])
