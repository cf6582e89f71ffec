"""The wheel ships the IDL: build it, install it into a fresh venv elsewhere, run from there."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
async def test_installed_wheel_serves_the_idl_from_package_data(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(ROOT)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = dist.glob("pubmon-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for idl in ("fb303.thrift", "publisher.thrift", "pubmon.thrift"):
        assert f"pubmon/idl/{idl}" in names
    assert "pubmon/py.typed" in names
    for asset in ("index.html", "publisher.html", "login.html", "dashboard.js", "dashboard.css"):
        assert f"pubmon/http/dashboard/{asset}" in names  # the HTTP dashboard needs no CDN
    for data in ("pubmon.1", "pubmon.bash", "_pubmon"):  # man page, bash and zsh completion
        assert f"pubmon/data/{data}" in names
    assert any(n.endswith(".data/data/share/man/man1/pubmon.1") for n in names), names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "-q", "--no-deps", str(wheel)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    # Dependencies come from the project's environment (no network needed); pubmon does not.
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", purelib],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    code = (
        "import pubmon, pubmon.thrift.idl as i; print(pubmon.__file__, i.pubmon().__thrift_file__)"
    )
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        check=True, capture_output=True, text=True, cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
    ).stdout.split()  # fmt: skip
    assert all(p.startswith(str(venv)) for p in where), where

    config = tmp_path / "pubmon.toml"
    sock = tmp_path / "pubmon.sock"
    config.write_text(
        f'[control]\nsocket = "{sock}"\n[monitor]\nlisten = ""\n'
        '[publisher.a]\ncommand = ["sleep", "3600"]\nstart_timeout = 0\n'
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    daemon = await asyncio.create_subprocess_exec(
        str(venv / "bin" / "pubmon"), "daemon", "--config", str(config),
        cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert daemon.stderr is not None
        async with asyncio.timeout(30):
            while b"ready:" not in await daemon.stderr.readline():
                pass
        status = await asyncio.create_subprocess_exec(
            str(venv / "bin" / "pubmon"), "status", "--socket", str(sock),
            cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(status.communicate(), 30)
        assert status.returncode == 0
        assert out.split(b"\n")[1].split()[:2] == [b"a", b"RUNNING"]
    finally:
        daemon.terminate()
        async with asyncio.timeout(30):
            await daemon.communicate()
    assert daemon.returncode == 0
