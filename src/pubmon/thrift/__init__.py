"""Thrift: the IDL (through thriftpy2), the binary codec, the framed server and the clients.

The bottom of pubmon: imports nothing of pubmon but `pubmon.host` and `pubmon.errors`.
"""
