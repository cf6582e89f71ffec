"""The supervisors compared: pubmon, supervisord and the floor (bare, and behind pubmon's
parent-death-signal wrapper), one class each."""

from contenders.base import Conn, Contender, DaemonDied, Program, Status
from contenders.floor import ArmFloor, Floor, WrappedFloor
from contenders.pubmon import Pubmon
from contenders.supervisord import Supervisord

CONTENDERS: dict[str, type[Contender]] = {
    c.name: c for c in (Pubmon, Supervisord, Floor, WrappedFloor, ArmFloor)
}

__all__ = ["CONTENDERS", "Conn", "Contender", "DaemonDied", "Program", "Status"]
