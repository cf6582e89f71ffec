import subprocess
import sys

import pubmon


def test_every_export_resolves() -> None:
    for name in pubmon.__all__:
        assert getattr(pubmon, name) is not None


def test_importing_pubmon_stays_light() -> None:
    # The CLI's start time depends on it: the package itself imports neither asyncio nor thrift.
    code = (
        "import sys, pubmon; print(sorted(m for m in ('asyncio', 'thriftpy2') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
