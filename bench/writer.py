"""A chatty child for the logs scenario: `writer.py SOURCE TIMING GO`.

Reads SOURCE (made by the benchmark: numbered lines of 100 bytes or a few KB) into memory,
creates TIMING.ready, waits for the file GO to exist (so that every writer of a run starts
together, however slowly the supervisor spawned them), writes it all to stdout in 1 MiB
os.write calls as fast as the pipe takes it, then records [start, end] of the writing
(time.monotonic(), the benchmark's clock) in TIMING. It never exits on its own, so no
supervisor restarts it to write it twice.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

source, timing, go = sys.argv[1:4]
data = memoryview(Path(source).read_bytes())
Path(timing + ".ready").touch()
while not os.path.exists(go):
    time.sleep(0.001)
block = 1 << 20
start = time.monotonic()
for offset in range(0, len(data), block):
    view = data[offset : offset + block]
    while view:
        view = view[os.write(1, view) :]
end = time.monotonic()
Path(timing + ".tmp").write_text(json.dumps([start, end]))
os.rename(timing + ".tmp", timing)
while True:
    signal.pause()
