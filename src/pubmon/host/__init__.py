"""What pubmon needs from the host beyond supervision: who may change a path (`trust`), sockets
handed over by an upgrade (`inherited`), helper threads that take no signals (`threads`).

Imports nothing of pubmon but `pubmon.errors`.
"""
