"""The supervision core: publishers as state machines, their processes, output and limits.

- `lifecycle`: states, health and the table of allowed moves; `policy`: backoff, crash window;
- `publisher`: one publisher's state machine and its requests; `runner`: the one task that
  handles its inbox, timers and spawn/stop steps; `watch`: the health watch that posts verdicts;
- `probe`: health probes (fb303 getStatus, tcp, exec); `memsweep`: memory_restart checks;
- `process`: spawning (process group, PDEATHSIG), `Child`, signalling by pidfd, exit text;
  `adopted`: a child carried over by an upgrade; `reaper`: orphans re-parented to us;
- `output`: child output into a ring and rotating files (`ring`, `logfile`, `logwriter`);
- `cgroup`, `usage`, `procstats`: a cgroup per publisher and what its processes use;
- `stats`: plain-data figures for metrics; `supervisor`: all publishers, reloads, shutdown.

Nothing here changes the process as a whole (subreaper, child watcher, reaping children it did
not spawn): that is the daemon's (pubmon.daemon.reaping), so a program may embed a Supervisor.

Imports only `pubmon.config`, `pubmon.thrift`, `pubmon.host` and `pubmon.errors`.
"""
