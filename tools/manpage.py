"""pubmon(1), written from the CLI's docopt text, so the man page and ``pubmon --help`` cannot
disagree. ``python tools/manpage.py > src/pubmon/data/pubmon.1`` regenerates it (a test
checks that the shipped page is current and that ``man -l`` renders it without a warning).
"""

from __future__ import annotations

__all__ = ["manpage"]

import re

from pubmon import __version__
from pubmon.cli import __doc__ as USAGE

SEE_ALSO = "supervisorctl(1), systemctl(1)"
ENVIRONMENT = (
    ("PUBMON_SOCKET", "The control socket, when --socket is not given."),
    ("PUBMON_CONFIG", "A config file whose [control] socket to use, when neither --socket, "
     "PUBMON_SOCKET nor --config is given; also the config of pubmon daemon without --config."),
)  # fmt: skip


def _esc(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def manpage() -> str:
    assert USAGE is not None
    head, rest = USAGE.split("Usage:", 1)
    usage, rest = rest.split("Options:", 1)
    options, notes = rest.split("\n\n", 1)
    out = [
        f'.TH PUBMON 1 "" "pubmon {__version__}" "User Commands"',
        ".SH NAME",
        "pubmon \\- " + _esc(head.strip().split(": ", 1)[1].rstrip(".")),
        ".SH SYNOPSIS",
        ".nf",
    ]
    out += [_esc(line.strip()) for line in usage.strip().splitlines()]
    out += [".fi", ".SH OPTIONS"]
    for m in re.finditer(r"^  (-\S+(?: \S+)?(?:, -\S+)?)\s{2,}(.*(?:\n {4,}.*)*)", options, re.M):
        flags, text = m.group(1), " ".join(x.strip() for x in m.group(2).splitlines())
        out += [".TP", f"\\fB{_esc(flags)}\\fR", _esc(text)]
    out += [".SH DESCRIPTION"]
    for para in notes.strip().split("\n\n"):
        out += [_esc(" ".join(x.strip() for x in para.splitlines())), ".PP"]
    out.pop()
    out += [".SH ENVIRONMENT"]
    for name, text in ENVIRONMENT:
        out += [".TP", f"\\fB{name}\\fR", _esc(text)]
    out += [".SH SEE ALSO", SEE_ALSO, ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(manpage(), end="")
