"""Hatchling build hook: compile pubmon's two optional native pieces (issue 16).

- `pubmon._linecount`, an extension module that counts log lines without the GIL;
- `pubmon/_arm`, a static executable that arms the parent-death signal and execs the command
  (one exec instead of `setpriv` + `sh`).

pubmon is a Python program and installs without a compiler: when there is no C compiler or no
Python headers, or a compile fails, the hook says so on stderr and the build goes on; pubmon
then counts lines with `bytes.count` (`pubmon.core.ring`) and spawns through setpriv and sh
(`pubmon.core.process`). With a compiler they are built with the interpreter's own flags
(`sysconfig`):

- wheel: into a temporary directory, shipped in `pubmon/`; the wheel is then tagged for this
  interpreter and platform instead of py3-none-any (so a user's machine needs no compiler);
- editable install (`pip install -e .`, what `make` does): into `src/pubmon/`, next to the
  sources the editable install imports (ignored by git).

`PUBMON_PURE_PYTHON=1` builds neither.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("src/pubmon/_linecount.c")
ARM_SOURCE = Path("src/pubmon/_arm.c")


def compile_arm(root: Path, out_dir: Path) -> Path | None:
    """Build the `_arm` executable into `out_dir`, static when the C library allows (no dynamic
    loader at each spawn); None (and a note on stderr) when it cannot be built."""
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if not shutil.which(cc[0]):
        return _skip("_arm", f"no C compiler ({cc[0]})")
    target = out_dir / "_arm"
    why = ""
    for link in (["-static"], []):
        step = [*cc, "-O2", "-s", *link, str(root / ARM_SOURCE), "-o", str(target)]
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            target.chmod(0o755)
            return target
        why = f"`{shlex.join(step)}` failed: {done.stderr.strip()[-500:]}"
    return _skip("_arm", why)


def compile_extension(root: Path, out_dir: Path) -> Path | None:
    """Build the extension into `out_dir`; None (and a note on stderr) when it cannot be."""
    source = root / SOURCE
    include = sysconfig.get_paths()["include"]
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if not shutil.which(cc[0]):
        return _skip("_linecount", f"no C compiler ({cc[0]})")
    if not Path(include, "Python.h").exists():
        return _skip("_linecount", f"no Python headers ({include}/Python.h)")
    target = out_dir / ("_linecount" + str(sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    cflags = shlex.split(sysconfig.get_config_var("CFLAGS") or "")
    ldshared = shlex.split(sysconfig.get_config_var("LDSHARED") or f"{cc[0]} -shared")
    flags = [f for f in cflags if not f.startswith("-O")] + ["-O2", "-fPIC", "-I", include]
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp, "_linecount.o")
        steps = [
            [*cc, *flags, "-c", str(source), "-o", str(obj)],
            [*ldshared, str(obj), "-o", str(target)],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                return _skip("_linecount", f"`{shlex.join(step)}` failed: {done.stderr[-500:]}")
    return target


_INSTEAD = {
    "_linecount": "log lines are counted with bytes.count instead (slower, same results)",
    "_arm": "publishers are spawned through setpriv and sh instead (slower, same guarantees)",
}


def _skip(what: str, why: str) -> None:
    print(f"pubmon: not building the optional {what}: {why}; {_INSTEAD[what]}", file=sys.stderr)
    return None


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or os.environ.get("PUBMON_PURE_PYTHON"):
            return
        root = Path(self.root)
        if version == "editable":
            compile_extension(root, root / SOURCE.parent)
            compile_arm(root, root / SOURCE.parent)
            return
        self._tmp = tempfile.TemporaryDirectory()
        out = Path(self._tmp.name)
        built = [p for p in (compile_extension(root, out), compile_arm(root, out)) if p]
        for path in built:
            build_data["force_include"][str(path)] = f"pubmon/{path.name}"
        if built:
            build_data["pure_python"] = False
            build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()
