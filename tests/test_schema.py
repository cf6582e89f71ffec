"""The IDL: thriftpy2 loads it (``pubmon.thrift.idl``, for the daemon's classes), and
``tools/schema_gen.py`` turns it into ``pubmon.thrift.schema``, the plain data the codec runs on.

The checked-in schema must equal the generator's output, so a change to ``idl/*.thrift`` that
is not regenerated fails here.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import schema_gen as _schema_gen
from thriftpy2.thrift import TType

from pubmon.thrift import codec, idl
from pubmon.thrift import schema as _schema

pm = idl.pubmon()
REPO = Path(__file__).resolve().parents[1]
SVC = pm.PubmonService
SERVICES = [idl.fb303().FacebookService, idl.publisher().PublisherService, SVC]
INFO = pm.PublisherInfo(
    name="feed:0", program="feed", state="RUNNING", pid=4242, health="HEALTHY", restarts=2,
    lastExit=-9, lastExitReason="killed by SIGKILL", uptime=12.5, port=9101, statusDetails="ok ✓",
)  # fmt: skip


# --- the generated schema ----------------------------------------------------------------------


def test_checked_in_schema_equals_the_generator_output() -> None:
    checked_in = Path(_schema.__file__).read_text()
    assert checked_in == _schema_gen.generate(), (
        "src/pubmon/thrift/schema.py is stale: run "
        "`python tools/schema_gen.py > src/pubmon/thrift/schema.py`"
    )


def test_generator_runs_as_a_module() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "schema_gen.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == Path(_schema.__file__).read_text()


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.__name__)
def test_schema_agrees_with_thriftpy2_on_every_method(service: Any) -> None:
    methods = _schema.SERVICES[service.__name__]
    assert list(methods) == list(service.thrift_services)
    for name, (args, result, oneway) in methods.items():
        args_cls, result_cls = getattr(service, f"{name}_args"), getattr(service, f"{name}_result")
        assert [f[1] for f in args] == [f[1] for f in args_cls.thrift_spec.values()]
        assert oneway == result_cls.oneway
        declared = {f[1]: f[2].__name__ for fid, f in result_cls.thrift_spec.items() if fid != 0}
        assert {f[1]: f[3] for f in result if f[0] != 0} == declared
        assert set(_schema.EXCEPTIONS) >= set(declared.values())
    classes = idl._classes()
    for name in _schema.STRUCTS:
        assert [f[1] for f in _schema.STRUCTS[name]] == [
            f[1] for f in classes[name].thrift_spec.values()
        ]
    assert _schema.ENUMS["fb_status"] == {s.name: s.value for s in idl.FbStatus}
    assert (_schema.STRING, _schema.LIST, _schema.CALL) == (TType.STRING, TType.LIST, 1)


# --- IDL loader -----------------------------------------------------------------------------


def test_idl_modules_share_fb303_and_fbstatus_mirrors_fb_status() -> None:
    assert pm.fb303 is idl.fb303() is idl.publisher().fb303
    assert sys.modules["pubmon_thrift"] is pm
    assert {s.name: s.value for s in idl.FbStatus} == idl.fb303().fb_status._NAMES_TO_VALUES
    assert set(idl.fb303().FacebookService.thrift_services) < set(SVC.thrift_services)
    assert SVC.shutdown_result.oneway and not SVC.getStatus_result.oneway


def test_bind_gives_thriftpy2_classes_to_the_codec() -> None:
    bound = idl.bind(SVC)
    assert bound is idl.bind(SVC) and bound.name == "PubmonService"
    assert bound.method("getPublisher").throws == ((pm.UnknownPublisher, "e"),)
    assert bound.method("startPublisher").denied == (pm.PermissionDenied, "e3")
    probe = idl.bind(idl.publisher().PublisherService)
    assert probe.method("startPublishers").throws == (
        (idl.publisher().PublisherServiceException, "ex"),
    )
    assert set(idl.bind("FacebookService").methods) < set(bound.methods)


def _shape(modules: dict[str, Any]) -> dict[str, Any]:
    """Everything that reaches the wire, with classes replaced by their names."""

    def spec(value: Any) -> Any:
        if isinstance(value, type):
            return value.__name__
        if isinstance(value, tuple | list):
            return [spec(v) for v in value]
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return value

    out = {}
    for mod_name, module in modules.items():
        for name, obj in sorted(vars(module).items()):
            if isinstance(obj, type) and hasattr(obj, "thrift_services"):
                for m in obj.thrift_services:
                    for suffix in ("_args", "_result"):
                        cls = getattr(obj, m + suffix)
                        out[f"{mod_name}.{name}.{m}{suffix}"] = spec(cls.thrift_spec)
                    out[f"{mod_name}.{name}.{m}.oneway"] = getattr(obj, m + "_result").oneway
            elif isinstance(obj, type) and hasattr(obj, "thrift_spec"):
                out[f"{mod_name}.{name}"] = spec(obj.thrift_spec)
            elif isinstance(obj, type) and hasattr(obj, "_NAMES_TO_VALUES"):
                out[f"{mod_name}.{name}"] = obj._NAMES_TO_VALUES
    return out


def test_idl_cache_keeps_one_entry_per_idl_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two checkouts (or an install and a checkout) starting in turn each keep their entry;
    a changed IDL replaces only its own directory's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parsed = idl._modules()
    sources = [("x.thrift", b"one")]
    a = idl._cache_file(Path("/a/idl"), sources)
    b = idl._cache_file(Path("/b/idl"), sources)
    assert a is not None and b is not None
    idl._write_cache(a, parsed)
    idl._write_cache(b, parsed)
    assert a.exists() and b.exists()
    a2 = idl._cache_file(Path("/a/idl"), [("x.thrift", b"two")])
    assert a2 is not None and a2 != a
    idl._write_cache(a2, parsed)
    assert sorted(p.name for p in (tmp_path / "pubmon").iterdir()) == sorted([a2.name, b.name])


def test_idl_cache_round_trips_and_refuses_foreign_files(tmp_path: Path) -> None:
    parsed = idl._modules()
    cache = tmp_path / "pubmon" / "idl-test.pickle"
    idl._write_cache(cache, parsed)
    assert stat.S_IMODE(os.stat(cache.parent).st_mode) == 0o700
    loaded = idl._read_cache(cache)
    assert loaded is not None and loaded["pubmon_thrift"] is not pm
    assert _shape(loaded) == _shape(parsed)
    again = loaded["pubmon_thrift"].PublisherInfo(**vars(INFO))
    assert codec.encode_struct(again) == codec.encode_struct(INFO)
    os.chmod(cache, 0o666)  # writable by others: unpickling it could run their code
    assert idl._read_cache(cache) is None
