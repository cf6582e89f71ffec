// pubmon dashboard: follows the daemon's server-sent events and draws them.
// Everything a publisher (or its output) says is put on the page with textContent or as a text
// node, never parsed as HTML: a log line "<script>..." shows as those characters.
"use strict";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function badge(text) {
  // The class is one of a fixed set of state names; anything else gets no colour.
  const known = /^(RUNNING|STARTING|STOPPING|BACKOFF|EXITED|FATAL|STOPPED|HEALTHY|DEGRADED|UNHEALTHY|UNKNOWN|ALIVE|WARNING|DEAD)$/;
  return el("span", text, "badge" + (known.test(text) ? " " + text : ""));
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "-";
  const s = Math.floor(seconds);
  if (s < 3600) return Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
  if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d" + String(Math.floor(s % 86400 / 3600)).padStart(2, "0") + "h";
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? String(n) : n.toFixed(1)) + " " + units[i];
}

function cpu(seconds) {
  return seconds === null || seconds === undefined ? "-" : seconds.toFixed(2) + " s";
}

function uptime(started) {
  return started ? duration(Date.now() / 1000 - started) : "-";
}

function publisherPath(name) {
  return "/p/" + encodeURIComponent(name);
}

function logPath(name, after) {
  return "/logs/" + encodeURIComponent(name) + "?after=" + String(after);
}

// --- the table ---------------------------------------------------------------------------

function drawTable(data) {
  const status = document.getElementById("status");
  status.replaceWith(badge(data.status));
  document.querySelector("header .badge").id = "status";
  const counts = {};
  for (const p of data.publishers) counts[p.state] = (counts[p.state] || 0) + 1;
  document.getElementById("summary").textContent =
    data.publishers.length + " publishers: " +
    Object.keys(counts).sort().map((k) => counts[k] + " " + k).join(", ");
  const body = document.createElement("tbody");
  for (const p of data.publishers) {
    const tr = document.createElement("tr");
    tr.dataset.name = p.name;
    tr.dataset.state = p.state;
    const name = el("td");
    const link = el("a", p.name);
    link.href = publisherPath(p.name);
    name.appendChild(link);
    tr.appendChild(name);
    const st = el("td"); st.appendChild(badge(p.state)); tr.appendChild(st);
    const hl = el("td"); hl.appendChild(badge(p.health)); tr.appendChild(hl);
    tr.appendChild(el("td", p.pid === null ? "-" : p.pid, "num"));
    const up = el("td", uptime(p.started), "num uptime");
    up.dataset.started = p.started === null ? "" : String(p.started);
    tr.appendChild(up);
    tr.appendChild(el("td", p.restarts, "num"));
    tr.appendChild(el("td", cpu(p.cpu), "num"));
    tr.appendChild(el("td", bytes(p.rss), "num"));
    tr.appendChild(el("td", p.fds === null ? "-" : p.fds, "num"));
    tr.appendChild(el("td", p.details, "details"));
    const log = el("td");
    const raw = el("a", "log");
    raw.href = logPath(p.name, 0);
    log.appendChild(raw);
    tr.appendChild(log);
    body.appendChild(tr);
  }
  document.querySelector("#publishers tbody").replaceWith(body);
}

function tickUptimes() {
  for (const td of document.querySelectorAll(".uptime")) {
    const started = td.dataset.started;
    td.textContent = started ? uptime(Number(started)) : "-";
  }
}

function followTable() {
  const events = new EventSource("/events");
  events.addEventListener("table", (e) => drawTable(JSON.parse(e.data)));
  events.addEventListener("error", () => {
    document.getElementById("live").textContent = "disconnected: retrying";
  });
  events.addEventListener("open", () => {
    document.getElementById("live").textContent = "live: updates arrive as they happen";
  });
  setInterval(tickUptimes, 1000);
}

// --- one publisher -----------------------------------------------------------------------

const MAX_LINES = 2000;

function drawPublisher(p) {
  document.getElementById("name").textContent = p.name;
  document.title = "pubmon: " + p.name;
  document.getElementById("state").replaceWith(badge(p.state));
  document.querySelector("header .badge").id = "state";
  const facts = document.createElement("dl");
  facts.id = "facts";
  const rows = [
    ["program", p.program], ["health", p.health], ["pid", p.pid === null ? "-" : p.pid],
    ["uptime", uptime(p.started)], ["restarts", p.restarts], ["exits", p.exits],
    ["last exit", p.last_exit_reason || "-"], ["cpu", cpu(p.cpu)], ["memory", bytes(p.rss)],
    ["open fds", p.fds === null ? "-" : p.fds], ["details", p.details || "-"],
  ];
  for (const [k, v] of rows) {
    facts.appendChild(el("dt", k));
    const dd = el("dd", v);
    if (k === "uptime") {
      dd.className = "uptime";
      dd.dataset.started = p.started === null ? "" : String(p.started);
    }
    facts.appendChild(dd);
  }
  document.getElementById("facts").replaceWith(facts);
  const body = document.createElement("tbody");
  for (const x of p.recent_exits) {
    const tr = document.createElement("tr");
    tr.appendChild(el("td", new Date(x.time * 1000).toLocaleString()));
    tr.appendChild(el("td", x.status === null ? "-" : x.status, "num"));
    tr.appendChild(el("td", x.count > 1 ? x.reason + " (" + x.count + " exits)" : x.reason));
    body.appendChild(tr);
  }
  if (!p.recent_exits.length) {
    const tr = document.createElement("tr");
    const td = el("td", "none since the daemon started", "muted");
    td.colSpan = 3;
    tr.appendChild(td);
    body.appendChild(tr);
  }
  document.querySelector("#exits tbody").replaceWith(body);
}

function appendLines(data) {
  const pre = document.getElementById("log");
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  if (data.missed) pre.appendChild(el("span", "... " + data.missed + " line(s) missed ...\n", "muted"));
  for (const line of data.lines) {
    const span = el("span", line.x + (line.p ? "" : "\n"), line.s === "stderr" ? "stderr" : "");
    span.dataset.seq = String(line.seq);
    pre.appendChild(span);
  }
  while (pre.childNodes.length > MAX_LINES) pre.removeChild(pre.firstChild);
  const first = pre.querySelector("span[data-seq]");
  if (first) {
    document.getElementById("rawlog").href =
      logPath(document.body.dataset.name, Number(first.dataset.seq) - 1);
  }
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

function followPublisher() {
  const name = decodeURIComponent(location.pathname.slice(3));
  document.body.dataset.name = name;
  document.getElementById("name").textContent = name;
  document.getElementById("rawlog").href = logPath(name, 0);
  const events = new EventSource("/events/" + encodeURIComponent(name));
  events.addEventListener("access", (e) => {
    const a = JSON.parse(e.data);
    const note = document.getElementById("lognote");
    if (a.logs) {
      note.textContent = "following: new lines appear as they are written";
    } else {
      note.textContent = a.token
        ? "Log lines need a credential: log in with the token."
        : "Log lines need a credential: configure [http] token_file or use a client certificate.";
    }
  });
  events.addEventListener("state", (e) => drawPublisher(JSON.parse(e.data)));
  events.addEventListener("log", (e) => appendLines(JSON.parse(e.data)));
  setInterval(tickUptimes, 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "table") followTable();
  else if (page === "publisher") followPublisher();
});
