"""Thrift: the IDL (`idl`, through thriftpy2), one binary codec (`codec`, driven by the generated
`schema`), the framed server (`server`, with `limits` and `peer`), the async client (`client`)
and the CLI's blocking one (`blocking`, free of asyncio and thriftpy2).

The bottom of pubmon: imports nothing of pubmon but `pubmon.host` and `pubmon.errors`.
"""
