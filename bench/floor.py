"""The floor: the least a Python supervisor can do.   floor.py CONFIG.json | floor.py --status SOCK

Spawns every instance with create_subprocess_exec, respawns it the moment it exits, copies its
output to <log_dir>/<name>.log, and answers each line on its unix socket with one JSON line
{name: pid} of the children alive. SIGTERM: SIGTERM every child, wait for them, exit.
With "wrapper": true in its config, every child is started behind the wrapper pubmon uses for
the parent-death signal (`setpriv --pdeathsig KILL -- sh -c CHECK`, in its own process group),
so that spawn can be compared with a floor paying the same no-orphan guarantee.
Imports are inside the functions so that `--status` (the floor's CLI) loads only `socket`.
"""

import sys

# pubmon.core.process._CHECK: the child goes on only if its parent did not die before the prctl
CHECK = 'test "$PPID" = "$0" || exit 111; exec "$@"'


def wrapper_arm():
    import importlib.util
    import os

    spec = importlib.util.find_spec("pubmon")
    path = os.path.join(os.path.dirname(spec.origin), "_arm")
    if not os.access(path, os.X_OK):
        raise SystemExit(f"floor: {path} is not built (no C compiler at pubmon's install)")
    return path


async def keep(name, argv, log_fd, procs, stopping, wrapper=False):
    import asyncio
    import os
    import shutil

    pipe = asyncio.subprocess.PIPE if log_fd is not None else asyncio.subprocess.DEVNULL
    extra = {}
    if wrapper == "arm":  # pubmon's one-exec wrapper (src/pubmon/_arm.c), when it is built
        argv = [wrapper_arm(), str(os.getpid()), "0", "", *argv]
        extra = {"process_group": 0}
    elif wrapper:
        setpriv = shutil.which("setpriv")
        argv = [
            setpriv,
            "--pdeathsig",
            "KILL",
            "--",
            "/bin/sh",
            "-c",
            CHECK,
            str(os.getpid()),
            *argv,
        ]
        extra = {"process_group": 0}
    while not stopping.is_set():
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=pipe,
            stderr=asyncio.subprocess.STDOUT,
            **extra,
        )
        procs[name] = proc
        if stopping.is_set():  # SIGTERM came while it was being spawned
            proc.terminate()
        while log_fd is not None and (data := await proc.stdout.read(1 << 20)):
            os.write(log_fd, data)
        await proc.wait()
        del procs[name]


async def main(cfg):
    import asyncio
    import json
    import os
    import resource
    import signal

    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    loop = asyncio.get_running_loop()
    watcher = asyncio.PidfdChildWatcher()  # 3.11 defaults to one thread per child
    watcher.attach_loop(loop)
    asyncio.set_child_watcher(watcher)
    procs, stopping, tasks = {}, asyncio.Event(), []
    loop.add_signal_handler(signal.SIGTERM, stopping.set)

    async def serve(reader, writer):
        while await reader.readline():
            writer.write(json.dumps({n: p.pid for n, p in procs.items()}).encode() + b"\n")
        writer.close()

    server = await asyncio.start_unix_server(serve, cfg["socket"])
    for p in cfg["programs"]:
        for i in range(p["numprocs"]):
            name, argv = f"{p['name']}:{i}", [a.replace("{i}", str(i)) for a in p["argv"]]
            log = cfg["log_dir"] and f"{cfg['log_dir']}/{name}.log"
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if log else None
            wrapper = cfg.get("wrapper", False)
            tasks.append(asyncio.create_task(keep(name, argv, fd, procs, stopping, wrapper)))
    await stopping.wait()
    server.close()
    for proc in list(procs.values()):
        try:
            proc.terminate()
        except ProcessLookupError:
            pass
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    if sys.argv[1] == "--status":
        import socket

        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sys.argv[2])
            s.sendall(b"\n")
            sys.stdout.write(s.makefile("r").readline())
    else:
        import asyncio
        import json
        from pathlib import Path

        asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
