"""The program: `daemon` (the top TaskGroup: lock, signals, listeners, supervisor, shutdown),
`signals`, `notify` (sd_notify), `lock`, `reaping` (the process as child subreaper, with the
pidfd child watcher and the orphan reaper), `upgrade` (re-exec in place) and `init` (PID 1)."""
