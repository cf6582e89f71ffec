/*
 * PubmonService: the pubmon daemon's own monitoring and control API.
 *
 * The same service is served on two listeners, each method at one of three access levels
 * (pubmon.access; each level includes the ones before it):
 *   - status: the fb303 getters, listPublishers, getPublisher;
 *   - logs: tailLog;                                           [logs]
 *   - control: every method marked [mutating], and getCpuProfile.
 * Who gets which level: on the unix control socket, SO_PEERCRED uid and groups against
 * [control] allow; on the TCP monitor listener, status only for peers without a client
 * certificate, and with mutual TLS the certificate's subject or SANs against [monitor] allow.
 * A refused call raises PermissionDenied naming the level and the config key that grants it.
 *
 * fb303 base methods keep their classic signatures. Their pubmon meanings:
 *   - getStatus: STARTING until the first autostart round settles, ALIVE when every wanted
 *     publisher is RUNNING and healthy, WARNING otherwise, STOPPING during shutdown.
 *   - reinitialize: reload the config file (like SIGHUP).      [mutating]
 *   - shutdown: stop every publisher and exit (like SIGTERM).  [mutating]
 *   - setOption: set a runtime option.                         [mutating]
 * An `extends` cannot add `throws` to inherited methods, so a refused call to a base method
 * cannot be answered with PermissionDenied: setOption (say) gets a TApplicationException
 * instead (type UNKNOWN = 0, message "PermissionDenied: ..."), and the oneway methods
 * (reinitialize, shutdown) get no reply at all; the daemon logs the refusal.
 */

include "fb303.thrift"

namespace py pubmon

/** One publisher instance, as seen by the daemon at the moment of the call. */
struct PublisherInfo {
  /** Instance name: the config name, or "name:i" when numprocs > 1. */
  1: string name,
  /** The [publisher.<program>] section this instance comes from. */
  2: string program,
  /** Lifecycle state: STOPPED, STARTING, RUNNING, PAUSED, BACKOFF, STOPPING, EXITED or FATAL. */
  3: string state,
  /** Process id of the running child; 0 = none. */
  4: i32 pid,
  /** Probe verdict: UNKNOWN, HEALTHY, DEGRADED or UNHEALTHY. */
  5: string health,
  /** Restarts since the daemon started (or since an operator's start). */
  6: i32 restarts,
  /** Exit status of the last exit, like Popen: negative = killed by that signal. Unset = never. */
  7: optional i32 lastExit,
  /** Why the last run ended (exited, killed by probe failures, stopped by operator, ...). */
  8: string lastExitReason,
  /** Seconds since the current run started; 0 when not running. */
  9: double uptime,
  /** The instance's port; 0 = none. */
  10: i32 port,
  /** The child's own fb303 getStatusDetails, or the probe's failure reason. */
  11: string statusDetails,
  /**
   * CPU seconds (user + system) of the publisher's whole process tree in its current run,
   * reaped children included, read from /proc at most once a second. Unset when not running.
   */
  12: optional double cpuSeconds,
  /** Resident memory of its process tree in bytes (summed per process). Unset when not running. */
  13: optional i64 memoryBytes,
  /** Open file descriptors of its process tree. Unset when not running. */
  14: optional i32 openFds,
  /** (Ids 20..29 are the CLI's.) BACKOFF: unix time of the next automatic start. */
  20: optional double backoffUntil,
  /** Unix time at which the current run started; unset when not running. */
  21: optional double startedAt,
  /** Unix time of the last state change (for "STOPPED since ..."). */
  22: optional double stateSince,
  /** The probe kind: none, tcp, fb303 or exec (health is NONE in `--json` for none). */
  23: optional string probe,
}

/** The daemon itself (pubmon status --json). */
struct DaemonInfo {
  1: i32 pid,
  2: string version,
  /** Unix time at which the daemon started. */
  3: double startedAt,
  4: string configPath,
  /** Why the last reload failed; "" when it did not. */
  5: string lastReloadError,
  6: i32 reloads,
}

/** What a reload did to one publisher instance. */
struct PublisherChange {
  1: string name,
  /** added, removed, restarted (spawn settings changed), updated (applied live), unchanged. */
  2: string change,
  /** The settings that differ, as dotted config keys (probe.interval, stop_timeout, ...). */
  3: list<string> fields,
}

/** What a config reload did, by publisher instance name. */
struct ReloadResult {
  1: list<string> added,
  2: list<string> removed,
  /** Restarted: spawn settings changed. (Those updated live are in `publishers`.) */
  3: list<string> changed,
  4: list<string> unchanged,
  /** Every instance of the old and the new config, in the new config's order. */
  5: list<PublisherChange> publishers,
  /** Daemon-level settings applied ([control], [monitor], [daemon]), one line each. */
  6: list<string> daemon,
}

/** One line of a publisher's output. */
struct LogLine {
  /** Sequence number, increasing by 1 per line per publisher. */
  1: i64 seq,
  /** Unix time (seconds) at which the line was read. */
  2: double time,
  /** "stdout" or "stderr". */
  3: string stream,
  /** The line without its newline; invalid UTF-8 is backslash-escaped. */
  4: string text,
  /** True when the line was cut at max_line and continues in the next LogLine. */
  5: bool partial,
}

/** A slice of the ring buffer. */
struct LogChunk {
  1: list<LogLine> lines,
  /** Pass as afterSeq of the next tailLog call to follow the log. */
  2: i64 nextSeq,
  /** Lines after afterSeq that fell out of the ring buffer before this call. */
  3: i64 missed,
}

/** What clearLog did (supervisorctl's clear). */
struct LogCleared {
  /** Lines dropped from the ring buffer. */
  1: i64 lines,
  /** Log files emptied (<name>.log, <name>.err.log) or removed (their rotated copies). */
  2: list<string> files,
  /** "" or why the files could not (all) be cleared. */
  3: string error,
}

/** No publisher instance has this name. */
exception UnknownPublisher {
  1: string message,
}

/** The request does not fit the publisher's current state. */
exception InvalidState {
  1: string message,
}

/** This peer may not make this call on this listener. */
exception PermissionDenied {
  1: string message,
}

/** The config file cannot be used; the old config stays in force. */
exception ConfigError {
  1: string message,
  /** One "dotted.key: what was expected" per problem. */
  2: list<string> problems,
}

/**
 * An upgrade the code on disk accepted: the daemon re-executes it right after this answer
 * (same pid, every publisher carried over). The new image counts it in getCounters:
 * daemon.upgrades becomes upgradesBefore + 1, with daemon.last_upgrade_pause_ms (how long
 * nothing was served nor read) and daemon.last_upgrade_adopted (publishers carried over).
 */
struct UpgradeResult {
  1: string oldVersion,
  2: string newVersion,
  /** Publisher processes being carried over. */
  3: i32 publishers,
  /** daemon.upgrades before this one. */
  4: i64 upgradesBefore,
}

/** The code on disk cannot take over (broken install, unknown state format, bad config). */
exception UpgradeRefused {
  1: string message,
}

service PubmonService extends fb303.FacebookService {
  /** Every publisher instance, in config order. */
  list<PublisherInfo> listPublishers(),

  PublisherInfo getPublisher(1: string name) throws (1: UnknownPublisher e),

  /**
   * Start a stopped, exited or FATAL instance; returns once it left STARTING (RUNNING, or
   * failed), or within NO_WAIT (0.1 s) when noWait: the request stays in force either way.
   * The same goes for stop and restart. [mutating]
   */
  PublisherInfo startPublisher(1: string name, 2: optional bool noWait)
      throws (1: UnknownPublisher e1, 2: InvalidState e2, 3: PermissionDenied e3),

  /** Stop an instance; the restart loop will not undo it. [mutating] */
  PublisherInfo stopPublisher(1: string name, 2: optional bool noWait)
      throws (1: UnknownPublisher e1, 2: InvalidState e2, 3: PermissionDenied e3),

  /** Stop then start an instance. [mutating] */
  PublisherInfo restartPublisher(1: string name, 2: optional bool noWait)
      throws (1: UnknownPublisher e1, 2: InvalidState e2, 3: PermissionDenied e3),

  /**
   * Freeze an instance's whole process tree through its cgroup (cgroup.freeze): RUNNING ->
   * PAUSED; its probes are suspended. InvalidState when pubmon runs it without a cgroup
   * ([daemon] cgroup, or Delegate=yes in the systemd unit) or it is not RUNNING. [mutating]
   */
  PublisherInfo pausePublisher(1: string name)
      throws (1: UnknownPublisher e1, 2: InvalidState e2, 3: PermissionDenied e3),

  /** Thaw a PAUSED instance: back to RUNNING, probes resume. [mutating] */
  PublisherInfo resumePublisher(1: string name)
      throws (1: UnknownPublisher e1, 2: InvalidState e2, 3: PermissionDenied e3),

  /**
   * Re-read the config file and apply the difference; answers once added and restarted
   * publishers settled. noWait: answers once the file was accepted (a bad one is still a
   * ConfigError), with what the reload is applying, which goes on. InvalidState once the
   * daemon is stopping. [mutating]
   */
  ReloadResult reloadConfig(1: optional bool noWait)
      throws (1: ConfigError e1, 2: PermissionDenied e2, 3: InvalidState e3),

  /**
   * Up to maxLines lines (1..10000) with seq > afterSeq, oldest first. afterSeq = 0: from the
   * oldest line kept; afterSeq = -N: the last N lines. When afterSeq is the newest line's seq,
   * the call waits up to 0.5 s for a new line before answering (a long poll for `tail -f`).
   * A cursor beyond the newest line (the daemon restarted) answers no lines and nextSeq = the
   * newest seq, so a follower resynchronises. Needs the logs access level. [logs]
   */
  LogChunk tailLog(1: string name, 2: i64 afterSeq, 3: i32 maxLines)
      throws (1: UnknownPublisher e, 2: PermissionDenied e2),

  /** The daemon's pid, version, start time, config file and last reload error. */
  DaemonInfo getDaemonInfo(),

  /**
   * What reloadConfig would do now, with nothing applied: the file is loaded and checked,
   * the publishers' changes and the daemon-level lines are those a reload would report.
   * Needs the control level: the daemon-level lines show pending allow-list changes.
   */
  ReloadResult diffConfig() throws (1: ConfigError e1, 2: PermissionDenied e2),

  /**
   * Send a signal (a name like "HUP" or "SIGUSR1", or a number) to a running instance's process
   * group; InvalidState when it has no process. [mutating]
   */
  PublisherInfo signalPublisher(1: string name, 2: string signal)
      throws (1: UnknownPublisher e1, 2: InvalidState e2, 3: PermissionDenied e3),

  /**
   * The daemon's own recent log records (a ring of the last 1000), as tailLog: name "pubmon",
   * stream the level name, same cursor rules (no long poll wait when nothing is new beyond
   * 0.5 s). Needs the logs access level. [logs]
   */
  LogChunk tailDaemonLog(1: i64 afterSeq, 2: i32 maxLines) throws (1: PermissionDenied e),

  /**
   * Upgrade in place: check that the pubmon on disk can take over, then re-execute it with
   * the same pid, config and flags; no publisher restarts. Refused (the daemon runs on) with
   * the check's reason. Connections are closed by the exec: reconnect, and see UpgradeResult.
   * [mutating]
   */
  UpgradeResult upgrade() throws (1: UpgradeRefused e1, 2: InvalidState e2, 3: PermissionDenied e3),

  /**
   * Clear an instance's log: empty its ring buffer (new readers see nothing from before;
   * a `tail -f` cursor stays valid and reports no lines missed), empty its log file(s) and
   * remove their rotated copies. The process is not touched. [mutating]
   */
  LogCleared clearLog(1: string name) throws (1: UnknownPublisher e1, 2: PermissionDenied e2),

  /** Reopen every publisher's log file (after rotation by an outside tool). [mutating] */
  void reopenLogs() throws (1: PermissionDenied e),
}
