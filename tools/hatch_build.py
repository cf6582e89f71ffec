"""Hatchling build hook: compile the optional `pubmon._linecount` extension (issue 16).

pubmon is a Python program and installs without a compiler: when there is no C compiler or no
Python headers, or the compile fails, the hook says so on stderr and the build goes on; pubmon
then counts lines with `bytes.count` (`pubmon.core.ring`). With a compiler the module is built
with the interpreter's own flags (`sysconfig`):

- wheel: into a temporary directory, shipped as `pubmon/_linecount<EXT_SUFFIX>`; the wheel is
  then tagged for this interpreter and platform instead of py3-none-any;
- editable install (`pip install -e .`, what `make` does): into `src/pubmon/`, next to the
  sources the editable install imports (ignored by git).
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


def compile_extension(root: Path, out_dir: Path) -> Path | None:
    """Build the extension into `out_dir`; None (and a note on stderr) when it cannot be."""
    source = root / SOURCE
    include = sysconfig.get_paths()["include"]
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if not shutil.which(cc[0]):
        return _skip(f"no C compiler ({cc[0]})")
    if not Path(include, "Python.h").exists():
        return _skip(f"no Python headers ({include}/Python.h)")
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
                return _skip(f"`{shlex.join(step)}` failed: {done.stderr.strip()[-500:]}")
    return target


def _skip(why: str) -> None:
    print(
        f"pubmon: not building the optional _linecount extension: {why}; "
        "log lines are counted with bytes.count instead (slower, same results)",
        file=sys.stderr,
    )
    return None


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or os.environ.get("PUBMON_PURE_PYTHON"):
            return
        root = Path(self.root)
        if version == "editable":
            compile_extension(root, root / SOURCE.parent)
            return
        self._tmp = tempfile.TemporaryDirectory()
        built = compile_extension(root, Path(self._tmp.name))
        if built is None:
            return
        build_data["force_include"][str(built)] = f"pubmon/{built.name}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()
