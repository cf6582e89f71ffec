"""The Thrift control and monitoring service: `handler` (PubmonService and its listeners, with
access levels) and `daemonlog` (the daemon's own recent log records, for `pubmon log`)."""
