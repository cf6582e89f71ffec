"""The program: `daemon` (the top TaskGroup: lock, signals, listeners, supervisor, shutdown),
`signals`, `notify` (sd_notify), `lock`, `upgrade` (re-exec in place), `init` (PID 1) and
`stdout` (publisher lines on the daemon's own stdout, for containers)."""
