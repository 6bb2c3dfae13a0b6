// webjobsd dashboard: hash-routed pages over the daemon's own REST API and log streams.
// Routes: #/ (jobs), #/job/{type}/{name}, #/run/{name}/{id}, #/log/{name},
// #/deployments[/{id}].
"use strict";

const REFRESH_MS = 3000;
const LIVE_MS = 1000; // a running deployment's record and log
const view = document.getElementById("view");
const crumbs = document.getElementById("crumbs");
let leaving = []; // timers and streams of the page shown now, ended on navigation

// -- small helpers ---------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const svg = ["svg", "rect", "line", "title", "g", "text", "a"].includes(tag) && attrs && attrs.svg;
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag)
                 : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "svg" || value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}
const s = (tag, attrs, ...children) => h(tag, { ...attrs, svg: true }, ...children);
const enc = encodeURIComponent;

// Every request URL is built on the page's origin, never relative to its address: opened as
// http://user:pass@host/, relative URLs inherit the credentials, and fetch refuses a URL that
// carries credentials. The browser sends the ones it was given for this origin by itself.
const sameOrigin = (path) => new URL(path, location.origin).href;

async function api(path, options = {}) {
  const response = await fetch(sameOrigin(path), { credentials: "same-origin", ...options,
    headers: { Accept: "application/json", ...(options.headers || {}) } });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).message || message; } catch (_) { /* not JSON */ }
    throw Object.assign(new Error(message), { status: response.status });
  }
  return response;
}
const getJson = async (path) => (await api(path)).json();

// Calls fn now and every ms until the page is left, the returned stop is called, or fn
// returns false (a finished deployment has nothing more to show).
function every(ms, fn) {
  let stopped = false;
  let timer = null;
  const stop = () => { stopped = true; clearTimeout(timer); };
  const tick = async () => {
    try { if (await fn() === false) stop(); } catch (error) { showError(error); }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  leaving.push(stop);
  return stop;
}

function showError(error) {
  const box = document.getElementById("page-error");
  if (box) box.textContent = error ? `Could not load: ${error.message}` : "";
}

const STATUS_CLASS = {
  Running: "ok", Success: "ok", Failed: "bad", Aborted: "bad", Stopped: "idle",
  Disabled: "idle", "Never run": "idle", Initializing: "warn", Starting: "warn",
  PendingRestart: "warn", Stopping: "warn", Pending: "warn", Building: "warn", Deploying: "warn",
};
const statusKind = (status) => STATUS_CLASS[status] || "info";
const badge = (status) => h("span", { class: `badge s-${statusKind(status)}`, text: status });

function parseDuration(text) { // .NET TimeSpan "c": [-][d.]hh:mm:ss[.fffffff]
  const m = /^(-)?(?:(\d+)\.)?(\d+):(\d+):(\d+)(\.\d+)?$/.exec(text || "");
  if (!m) return 0;
  const seconds = (+(m[2] || 0)) * 86400 + (+m[3]) * 3600 + (+m[4]) * 60 + (+m[5]) + (+(m[6] || 0));
  return m[1] ? -seconds : seconds;
}

function formatSeconds(seconds) {
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.round(seconds % 3600 / 60)} min`;
  return `${Math.floor(seconds / 86400)} d ${Math.round(seconds % 86400 / 3600)} h`;
}

function ago(iso) {
  const t = Date.parse(iso);
  if (!Number.isFinite(t)) return "";
  const seconds = Math.max(0, (Date.now() - t) / 1000);
  if (seconds < 10) return "just now";
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

function until(iso) {
  const t = Date.parse(iso);
  if (!Number.isFinite(t)) return "";
  const seconds = (t - Date.now()) / 1000;
  if (seconds < 1) return "now";
  if (seconds < 60) return `in ${Math.round(seconds)} s`;
  if (seconds < 3600) return `in ${Math.round(seconds / 60)} min`;
  if (seconds < 86400) return `in ${Math.round(seconds / 3600)} h`;
  return `in ${Math.round(seconds / 86400)} d`;
}

const localTime = (iso) => new Date(iso).toLocaleString([], { month: "short", day: "numeric",
  hour: "2-digit", minute: "2-digit", timeZoneName: "short" });

// A schedule from /api/schedules: the words, the expression, and when it fires next.
function scheduleInfo(entry) {
  const words = entry.description || entry.schedule;
  const zone = entry.time_zone && entry.time_zone !== "UTC" ? ` (${entry.time_zone})` : "";
  let next;
  if (entry.status === "scheduled") {
    next = h("span", { class: "next-run" }, "next ",
      h("time", { datetime: entry.next_run, title: `${entry.next_run} (UTC)`,
        text: `${until(entry.next_run)} · ${localTime(entry.next_run)}` }));
  } else {
    const why = { never: "never fires again", invalid: `invalid: ${entry.error}`,
      disabled: "schedules are disabled (WEBJOBS_DISABLE_SCHEDULE)", pending: "not registered yet" };
    next = h("span", { class: entry.status === "invalid" ? "next-run error" : "next-run muted",
      text: why[entry.status] || entry.status });
  }
  return h("div", { class: "schedule" },
    h("span", { class: "words", text: `${words}${zone}` }), " ",
    h("code", { class: "muted", text: entry.schedule }), h("br"), next);
}

const jobStatus = (job) => job.type === "continuous"
  ? job.status : (job.latest_run ? job.latest_run.status : "Never run");

function setPage(title, trail, ...content) {
  document.title = `${title} · webjobsd`;
  crumbs.replaceChildren(...trail.flatMap((item) => [" / ", item]));
  view.replaceChildren(h("h1", { text: title }), h("p", { id: "page-error", class: "error",
    role: "alert" }), ...content);
}

function settingsSection(url) {
  const pre = h("pre", { class: "settings", "aria-label": "Settings" }, "Loading…");
  getJson(url).then((settings) => {
    pre.textContent = Object.keys(settings).length ? JSON.stringify(settings, null, 2)
      : "No settings.job: the defaults apply.";
  }, showError);
  return h("section", { "aria-labelledby": "settings-h" },
    h("h2", { id: "settings-h", text: "Settings" }), pre);
}

// -- the jobs page ---------------------------------------------------------------------------

function jobsPage() {
  const typeSelect = h("select", { id: "filter-type" },
    h("option", { value: "", text: "All types" }),
    h("option", { value: "triggered", text: "Triggered" }),
    h("option", { value: "continuous", text: "Continuous" }));
  const statusSelect = h("select", { id: "filter-status" },
    h("option", { value: "", text: "All statuses" }));
  const body = h("tbody");
  const summary = h("p", { class: "muted", "aria-live": "polite" });
  const progress = uploadProgress();
  const uploadMessage = h("p", { id: "redeploy-message", role: "status" });
  let jobs = [];
  let schedules = new Map();
  let refresh = async () => {};

  function render() {
    const type = typeSelect.value;
    const status = statusSelect.value;
    const statuses = [...new Set(jobs.map(jobStatus))].sort();
    if (status && !statuses.includes(status)) statuses.push(status);
    statusSelect.replaceChildren(h("option", { value: "", text: "All statuses" }),
      ...statuses.map((st) => h("option", { value: st, text: st, selected: st === status })));
    const shown = jobs.filter((j) => (!type || j.type === type) && (!status || jobStatus(j) === status));
    summary.textContent = `${shown.length} of ${jobs.length} jobs`;
    body.replaceChildren(...shown.map((job) => {
      const run = job.latest_run;
      const schedule = job.type === "triggered" && schedules.get(job.name);
      const row = h("tr", { class: "job", "data-name": job.name },
        h("td", { "data-label": "Name" },
          h("a", { href: `#/job/${job.type}/${enc(job.name)}`, text: job.name })),
        h("td", { "data-label": "Type", text: job.type }),
        h("td", { "data-label": "Status" }, badge(jobStatus(job))),
        h("td", { "data-label": "Command" }, h("code", { text: job.run_command })),
        h("td", { "data-label": "Schedule" },
          schedule ? scheduleInfo(schedule) : h("span", { class: "muted", text: "—" })),
        h("td", { "data-label": "Latest run" }, run
          ? [h("a", { href: `#/run/${enc(job.name)}/${enc(run.id)}` }, badge(run.status)), " ",
             h("time", { datetime: run.start_time, title: run.start_time, text: ago(run.start_time) })]
          : job.type === "continuous"
            ? h("a", { href: `#/log/${enc(job.name)}`, text: "live log" })
            : h("span", { class: "muted", text: "—" })));
      acceptDrops(row, async (file) => {
        if (await redeployJob(job.type, job.name, file, progress, uploadMessage)) {
          await refresh().catch(showError);
        }
      });
      return row;
    }));
  }

  typeSelect.addEventListener("change", render);
  statusSelect.addEventListener("change", render);
  setPage("Jobs", [],
    h("div", { class: "filters", role: "search" },
      h("label", { for: "filter-type" }, "Type", typeSelect),
      h("label", { for: "filter-status" }, "Status", statusSelect)),
    summary, progress.box, uploadMessage,
    h("table", { class: "jobs" },
      h("caption", { class: "muted", style: "text-align:left", text: "Every job on this site " +
        "(drop a zip on a job's row to redeploy that job)" }),
      h("thead", {}, h("tr", {}, ["Name", "Type", "Status", "Command", "Schedule", "Latest run"]
        .map((t) => h("th", { scope: "col", text: t })))),
      body));
  refresh = async () => {
    const [all, scheduled] = await Promise.all([getJson("/api/webjobs"), getJson("/api/schedules")]);
    jobs = all;
    schedules = new Map(scheduled.map((entry) => [entry.name, entry]));
    showError(null);
    render();
  };
  every(REFRESH_MS, refresh);
}

// -- the job pages ---------------------------------------------------------------------------

function runChart(name, runs) {
  const ordered = [...runs].reverse(); // oldest first, left to right
  const width = 600;
  const height = 160;
  const top = 8;
  const bottom = 18;
  const longest = Math.max(0.001, ...ordered.map((r) => parseDuration(r.duration)));
  const slot = ordered.length ? width / ordered.length : width;
  const bars = ordered.map((run, i) => {
    const seconds = parseDuration(run.duration);
    const barHeight = Math.max(2, (height - top - bottom) * seconds / longest);
    const label = `Run ${run.id}: ${run.status}, started ${run.start_time}, took ${formatSeconds(seconds)}`;
    return s("a", { href: `#/run/${enc(name)}/${enc(run.id)}`, "aria-label": label },
      s("rect", { class: `bar f-${statusKind(run.status)}`, "data-run-id": run.id,
        x: (i * slot + slot * 0.1).toFixed(2), width: Math.max(1, slot * 0.8).toFixed(2),
        y: (height - bottom - barHeight).toFixed(2), height: barHeight.toFixed(2) },
        s("title", { text: `${run.id} · ${run.status}\nstart ${run.start_time}\n` +
          `duration ${run.duration} (${formatSeconds(seconds)})` })));
  });
  return s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none",
    role: "img", "aria-label": `Duration of the last ${ordered.length} runs, oldest first` },
    s("line", { class: "axis", x1: 0, x2: width, y1: height - bottom, y2: height - bottom }),
    s("text", { x: 2, y: height - 4, text: ordered.length ? "oldest" : "no runs yet" }),
    s("text", { x: width - 2, y: height - 4, "text-anchor": "end", text: `longest ${formatSeconds(longest)}` }),
    bars);
}

function median(values) {
  if (!values.length) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

function stat(label, value, id) {
  return h("div", {}, h("dt", { text: label }), h("dd", { id, text: value }));
}

function triggeredPage(name) {
  const base = `/api/triggeredwebjobs/${enc(name)}`;
  const chartBox = h("div", { id: "chart" });
  const stats = h("dl", { class: "stats" });
  const argsInput = h("input", { id: "run-arguments", type: "text", name: "arguments",
    placeholder: "e.g. --full \"two words\"", autocomplete: "off" });
  const runButton = h("button", { type: "submit", id: "run-button", text: "Run" });
  const runMessage = h("p", { class: "muted", role: "status" });
  const recent = h("ul", { id: "recent-runs" });
  const scheduleBox = h("div", { id: "job-schedule" });

  async function refresh() {
    const [{ runs }, scheduled] = await Promise.all([getJson(`${base}/history`),
      getJson("/api/schedules")]);
    showError(null);
    const entry = scheduled.find((e) => e.name === name);
    scheduleBox.replaceChildren(entry ? scheduleInfo(entry)
      : h("span", { class: "muted", text: "No schedule: runs only when asked." }));
    const finished = runs.filter((r) => r.status === "Success" || r.status === "Failed");
    const ok = finished.filter((r) => r.status === "Success").length;
    const durations = finished.map((r) => parseDuration(r.duration));
    stats.replaceChildren(
      stat("Runs", String(runs.length), "stat-runs"),
      stat("Success rate", finished.length ? `${Math.round(100 * ok / finished.length)} %` : "—",
        "stat-success"),
      stat("Median duration", durations.length ? formatSeconds(median(durations)) : "—",
        "stat-median"));
    chartBox.replaceChildren(runChart(name, runs));
    recent.replaceChildren(...runs.slice(0, 10).map((run) => h("li", {},
      h("a", { href: `#/run/${enc(name)}/${enc(run.id)}`, text: `Run ${run.id}` }), " ",
      badge(run.status), " ",
      h("time", { datetime: run.start_time, title: run.start_time, text: ago(run.start_time) }),
      h("span", { class: "muted", text: ` · ${formatSeconds(parseDuration(run.duration))}` }))));
  }

  async function run(event) {
    event.preventDefault();
    runButton.disabled = true;
    try {
      const query = argsInput.value.trim() ? `?arguments=${enc(argsInput.value)}` : "";
      const response = await api(`${base}/run${query}`, { method: "POST" });
      const id = (response.headers.get("Location") || "").split("/").pop();
      runMessage.replaceChildren("Started ", h("a", { href: `#/run/${enc(name)}/${enc(id)}`,
        text: `run ${id}` }), ".");
      await refresh();
    } catch (error) {
      runMessage.textContent = `Not started: ${error.message}`;
    } finally {
      runButton.disabled = false;
    }
  }

  setPage(name, [h("span", { text: "triggered" })],
    h("section", { "aria-labelledby": "schedule-h" },
      h("h2", { id: "schedule-h", text: "Schedule" }), scheduleBox),
    h("section", { "aria-labelledby": "run-h" }, h("h2", { id: "run-h", text: "Run now" }),
      h("form", { class: "row", onsubmit: run },
        h("label", { for: "run-arguments" }, "Arguments", argsInput), runButton),
      runMessage),
    h("section", { "aria-labelledby": "history-h" },
      h("h2", { id: "history-h", text: "Run history" }), stats, chartBox,
      h("h3", { text: "Latest runs" }), recent),
    settingsSection(`${base}/settings`), redeploySection("triggered", name, refresh));
  every(REFRESH_MS, refresh);
}

const ENDED = { exited: "exited", stopped: "was stopped", "failed to start": "could not start",
  lost: "was lost (the daemon stopped)" };

function exitText(entry) {
  if (entry.exit_code === null || entry.exit_code === undefined) return "";
  return entry.exit_code < 0 ? ` (signal ${-entry.exit_code})` : ` (code ${entry.exit_code})`;
}

function startsChart(starts) {
  const width = 600;
  const height = 50;
  if (!starts.length) return h("p", { class: "muted", text: "Not started yet." });
  const first = Date.parse(starts[0].start_time);
  const span = Math.max(1, Date.now() - first);
  return s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, style: "height:50px",
    preserveAspectRatio: "none", role: "img",
    "aria-label": `${starts.length} starts since ${starts[0].start_time}` },
    s("line", { class: "axis", x1: 0, x2: width, y1: 30, y2: 30 }),
    starts.map((entry) => {
      const x = (width - 4) * (Date.parse(entry.start_time) - first) / span + 2;
      const ended = entry.ended ? `, ${ENDED[entry.ended] || entry.ended}${exitText(entry)}` +
        (entry.end_time ? ` at ${entry.end_time}` : "") : ", running";
      return s("line", { class: entry.restart ? "tick restart" : "tick", x1: x, x2: x, y1: 14, y2: 30 },
        s("title", { text: `${entry.restart ? "Restarted" : "Started"} ${entry.start_time} on ` +
          `${entry.instance_id}, pid ${entry.pid ?? "—"}${ended}` }));
    }),
    s("text", { x: 2, y: 44, text: starts[0].start_time.replace("T", " ").slice(0, 19) }),
    s("text", { x: width - 2, y: 44, "text-anchor": "end", text: "now" }));
}

function continuousPage(name) {
  const base = `/api/continuouswebjobs/${enc(name)}`;
  const statusBox = h("span", { id: "job-status", "aria-live": "polite" });
  const stopButton = h("button", { type: "button", id: "stop-button", class: "secondary",
    text: "Stop", onclick: () => act("stop") });
  const startButton = h("button", { type: "button", id: "start-button", text: "Start",
    onclick: () => act("start") });
  const stats = h("dl", { class: "stats" });
  const starts = h("div", { id: "starts" });
  const lastEnd = h("p", { class: "muted", id: "last-end" });

  async function refresh() {
    const job = await getJson(base);
    showError(null);
    statusBox.replaceChildren(badge(job.status));
    stopButton.disabled = job.status === "Stopped";
    startButton.disabled = job.status !== "Stopped";
    const { starts: entries, restarts, instance_id: here } = await getJson(`${base}/starts`);
    // The process of the instance that answered; another live instance's if it has none.
    const open = entries.filter((e) => e.ended === null);
    const mine = open.filter((e) => e.instance_id === here);
    const candidates = mine.length ? mine : open;
    const current = candidates[candidates.length - 1];
    const up = job.status === "Running" && current
      ? formatSeconds((Date.now() - Date.parse(current.start_time)) / 1000) : "—";
    stats.replaceChildren(stat("Uptime", up, "stat-uptime"),
      stat("Starts", String(entries.length), "stat-starts"),
      stat("Restarts after an exit", String(restarts), "stat-restarts"));
    const ended = entries.filter((e) => e.ended);
    const last = ended[ended.length - 1];
    lastEnd.textContent = last ? `Last end: ${ENDED[last.ended] || last.ended}${exitText(last)}, ` +
      `${ago(last.end_time || last.start_time)}.` : "";
    starts.replaceChildren(startsChart(entries));
  }

  async function act(what) {
    stopButton.disabled = startButton.disabled = true;
    try {
      await api(`${base}/${what}`, { method: "POST" });
      await refresh();
    } catch (error) {
      showError(error);
    }
  }

  setPage(name, [h("span", { text: "continuous" })],
    h("section", { "aria-labelledby": "state-h" }, h("h2", { id: "state-h", text: "State" }),
      h("p", { class: "row" }, "Status: ", statusBox, stopButton, startButton,
        h("a", { href: `#/log/${enc(name)}`, text: "Live log" })),
      stats, lastEnd, h("h3", { text: "Starts over time" }), starts),
    settingsSection(`${base}/settings`), redeploySection("continuous", name, refresh));
  every(REFRESH_MS, refresh);
}

// -- live logs -------------------------------------------------------------------------------

const ERR_LINE = /: (SYS )?ERR\s*\]/;

// A log box that keeps to its end while the reader is there, and stays put (with a way back)
// once they scroll up to read.
function followedLog(label) {
  const box = h("div", { class: "log", id: "log", role: "log", tabindex: "0", "aria-label": label });
  const state = h("span", { class: "muted", id: "follow-state", text: "Following the end." });
  const jump = h("button", { type: "button", class: "secondary", hidden: true, text: "Jump to end",
    onclick: () => { box.scrollTop = box.scrollHeight; } });
  let follow = true;
  box.addEventListener("scroll", () => {
    follow = box.scrollTop + box.clientHeight >= box.scrollHeight - 8;
    state.textContent = follow ? "Following the end." : "Paused: scroll to the bottom to follow.";
    jump.hidden = follow;
  });
  return { box, state, controls: h("div", { class: "follow" }, state, jump),
    following: () => follow,
    keepToEnd: () => { if (follow) box.scrollTop = box.scrollHeight; } };
}

function logViewer(url, onEnd) {
  const { box, state, controls, following, keepToEnd } = followedLog("Log lines");
  function add(text, kind) {
    box.append(h("div", { class: `line${kind ? ` ${kind}` : ""}`, text }));
    keepToEnd();
  }
  const stream = new EventSource(sameOrigin(url));
  stream.onmessage = (event) => {
    for (const line of event.data.split("\n")) add(line, ERR_LINE.test(line) ? "err" : "");
  };
  for (const kind of ["rotated", "truncated"]) {
    stream.addEventListener(kind, () => add(`— the log was ${kind}; going on from its start —`, "note"));
  }
  stream.addEventListener("end", (event) => {
    stream.close();
    let detail = {};
    try { detail = JSON.parse(event.data); } catch (_) { /* keep {} */ }
    add(`— end of stream (${detail.reason || "closed"}) —`, "note");
    state.textContent = "The stream has ended.";
    if (onEnd) onEnd(detail);
  });
  stream.onerror = () => {
    if (stream.readyState === EventSource.CONNECTING) state.textContent = "Reconnecting…";
  };
  stream.onopen = () => { state.textContent = following() ? "Following the end." : state.textContent; };
  leaving.push(() => stream.close());
  return [controls, box];
}

function runPage(name, id) {
  const statusBox = h("span", { id: "run-status" });
  const facts = h("p", { class: "muted" });
  const url = `/api/triggeredwebjobs/${enc(name)}/history/${enc(id)}`;
  async function refresh() {
    const run = await getJson(url);
    statusBox.replaceChildren(badge(run.status));
    facts.textContent = `Started ${run.start_time} (${ago(run.start_time)}), ` +
      `duration ${formatSeconds(parseDuration(run.duration))}, trigger: ${run.trigger}`;
  }
  setPage(`Run ${id}`, [h("a", { href: `#/job/triggered/${enc(name)}`, text: name })],
    h("p", {}, "Status: ", statusBox), facts,
    ...logViewer(`${url}/logstream`, () => refresh().catch(showError)));
  refresh().catch(showError);
}

function logPage(name) {
  setPage(`Log of ${name}`, [h("a", { href: `#/job/continuous/${enc(name)}`, text: name })],
    ...logViewer(`/api/continuouswebjobs/${enc(name)}/logstream`));
}

// -- uploads: drop a zip, or choose one ------------------------------------------------------

const isZip = (file) => /\.zip$/i.test(file.name);
const localPath = (url) => { const u = new URL(url, location.origin); return u.pathname + u.search; };

function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1048576) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

// A bar that shows how much of an upload has been sent; hidden until the first upload.
function uploadProgress() {
  const bar = h("progress", { id: "upload-progress", max: "100", value: "0",
    "aria-label": "Upload progress" });
  const text = h("span", { class: "muted", id: "upload-percent" });
  const box = h("div", { class: "upload-progress", hidden: true }, bar, text);
  return { box, set(sent, total) {
    const percent = total ? Math.min(100, Math.floor(100 * sent / total)) : 100;
    box.hidden = false;
    bar.value = percent;
    text.textContent = `${percent} % of ${formatBytes(total)}`;
  } };
}

// XMLHttpRequest rather than fetch: only it reports how much of a request body has been sent.
function upload(method, path, file, headers, progress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, sameOrigin(path));
    xhr.setRequestHeader("Accept", "application/json");
    for (const [name, value] of Object.entries(headers)) xhr.setRequestHeader(name, value);
    progress.set(0, file.size);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) progress.set(event.loaded, event.total);
    });
    // A small body may be sent before any progress event: its end is 100 % all the same.
    xhr.upload.addEventListener("load", () => progress.set(file.size, file.size));
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) { resolve(xhr); return; }
      let message = `${xhr.status} ${xhr.statusText}`;
      try { message = JSON.parse(xhr.responseText).message || message; } catch (_) { /* not JSON */ }
      reject(new Error(message));
    });
    xhr.addEventListener("error", () => reject(new Error("the upload was cut off")));
    xhr.send(file);
  });
}

const carriesFiles = (event) => Boolean(event.dataTransfer) &&
  Array.from(event.dataTransfer.types || []).includes("Files");

// Makes `target` take a dropped file; returns how to stop. Nested targets (a job's row inside
// the page) take the drop first and keep it from their parents.
function acceptDrops(target, onFile) {
  const over = (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    event.stopPropagation();
    event.dataTransfer.dropEffect = "copy";
    target.classList.add("drop-over");
  };
  const out = (event) => {
    if (!target.contains(event.relatedTarget)) target.classList.remove("drop-over");
  };
  const drop = (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    event.stopPropagation();
    target.classList.remove("drop-over");
    const file = event.dataTransfer.files[0];
    if (file) onFile(file);
  };
  target.addEventListener("dragenter", over);
  target.addEventListener("dragover", over);
  target.addEventListener("dragleave", out);
  target.addEventListener("drop", drop);
  return () => {
    target.classList.remove("drop-over");
    for (const [kind, fn] of [["dragenter", over], ["dragover", over], ["dragleave", out],
      ["drop", drop]]) target.removeEventListener(kind, fn);
  };
}

// A file dropped where nothing takes it must not make the browser open it (and leave the page).
document.addEventListener("dragover", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  event.dataTransfer.dropEffect = "none";
});
document.addEventListener("drop", (event) => { if (carriesFiles(event)) event.preventDefault(); });

// PUT /api/{type}webjobs/{name} with the zip: Kudu's way of replacing one job.
async function redeployJob(type, name, file, progress, message) {
  if (!isZip(file)) {
    message.textContent = `Not deployed: ${file.name} is not a .zip file.`;
    return false;
  }
  // The header is Latin-1 only; the daemon reads just the .zip ending from it.
  const filename = /^[\x20-\x7e]+$/.test(name) ? name.replace(/["\\]/g, "\\$&") : "job";
  message.textContent = `Uploading ${file.name} to ${name}…`;
  try {
    await upload("PUT", `/api/${type}webjobs/${enc(name)}`, file, {
      "Content-Type": "application/zip",
      "Content-Disposition": `attachment; filename="${filename}.zip"` }, progress);
    message.textContent = `${name} redeployed from ${file.name}.`;
    return true;
  } catch (error) {
    message.textContent = `Not deployed: ${error.message}`;
    return false;
  }
}

// The job pages' way to replace the job: drop a zip on the page, or choose one.
function redeploySection(type, name, refresh) {
  const progress = uploadProgress();
  const message = h("p", { id: "redeploy-message", role: "status" });
  const input = h("input", { type: "file", id: "job-zip", accept: ".zip,application/zip" });
  const take = async (file) => {
    input.disabled = true;
    if (await redeployJob(type, name, file, progress, message)) await refresh().catch(showError);
    input.disabled = false;
    input.value = "";
  };
  input.addEventListener("change", () => { if (input.files[0]) take(input.files[0]); });
  leaving.push(acceptDrops(view, take));
  return h("section", { "aria-labelledby": "redeploy-h" },
    h("h2", { id: "redeploy-h", text: "Redeploy" }),
    h("p", { class: "muted", text: "Drop a zip anywhere on this page to replace the job's " +
      "files with it (the whole folder, settings.job included), or choose one:" }),
    h("label", { for: "job-zip" }, "Zip to replace this job", input), progress.box, message);
}

// -- deployments -----------------------------------------------------------------------------

const DEPLOY_STATUS = ["Pending", "Building", "Deploying", "Failed", "Success"]; // Kudu's numbers
const deployStatus = (record) => DEPLOY_STATUS[record.status] || String(record.status);
const deployFinished = (record) => record.status === 3 || record.status === 4;
const shortId = (id) => (/^[0-9a-f-]{20,}$/i.test(id) ? id.slice(0, 8) : id);

function deployDuration(record) {
  const end = record.end_time ? Date.parse(record.end_time) : Date.now();
  const start = Date.parse(record.start_time || record.received_time);
  return Number.isFinite(start) ? formatSeconds(Math.max(0, (end - start) / 1000)) : "—";
}

// "continuous/name" entries of a record's changed_jobs / removed_jobs.
function jobList(keys, linked) {
  if (!Array.isArray(keys) || !keys.length) return h("span", { class: "muted", text: "none" });
  return h("ul", { class: "inline" }, keys.map((key) => {
    const [type, ...rest] = key.split("/");
    const name = rest.join("/");
    const label = name ? `${name} (${type})` : key;
    return h("li", {}, linked && name ? h("a", { href: `#/job/${type}/${enc(name)}`, text: label })
      : label);
  }));
}

// A deployment's structured log, polled: each entry once, in order, with its details (Kudu's
// child entries, at any depth) under it. An entry's details are read again until a later
// sibling exists (the pipeline writes an entry's details before it moves on), and once more
// when the deployment has ended.
function deploymentLog(id, followed) {
  const base = `/api/deployments/${enc(id)}/log`;
  // By parent id ("" the top): the lines shown and the box of each one's details.
  const shown = new Map([["", { lines: [], details: [], box: followed.box }]]);
  const settled = new Set();
  const kindOf = (entry) => (entry.type === 2 ? " err" : entry.type === 1 ? " warn" : "");
  const read = async (path) => {
    try { return await getJson(path); } catch (error) {
      if (error.status === 404) return []; // nothing written yet
      throw error;
    }
  };
  async function walk(entries, parent, final) {
    const known = shown.get(parent);
    for (const [index, entry] of entries.entries()) {
      if (!known.lines[index]) {
        const line = h("div", { class: "line" }, h("time", { datetime: entry.log_time,
          title: entry.log_time, text: (entry.log_time || "").slice(11, 19) }), "  ", entry.message);
        const details = h("div", { class: "details" });
        known.box.append(h("div", { class: "entry" }, line, details));
        known.lines[index] = line;
        known.details[index] = details;
      }
      // An entry has an id once it has details, which may come after it was shown.
      if (entry.id && !shown.has(entry.id)) {
        shown.set(entry.id, { lines: [], details: [], box: known.details[index] });
      }
      known.lines[index].className = `line${kindOf(entry)}`; // raised to its worst detail's type
      if (!entry.id || !entry.details_url || settled.has(entry.id)) continue;
      const closed = final || index + 1 < entries.length;
      await walk(await read(`${base}/${enc(entry.id)}`), entry.id, closed);
      if (closed) settled.add(entry.id);
    }
  }
  return async function update(final) {
    await walk(await read(base), "", final);
    followed.keepToEnd();
  };
}

// One record, followed until it ends; `changed` hears of each new status (the history's row).
function deploymentView(id, changed) {
  const statusBox = h("span", { id: "deployment-status", "aria-live": "polite" });
  const facts = h("dl", { class: "stats facts" });
  const changedJobs = h("div", { id: "changed-jobs" });
  const removed = h("div", { id: "removed-jobs" });
  const followed = followedLog("Deployment log");
  followed.box.classList.add("fits");
  let lastStatus = null;
  const update = deploymentLog(id, followed);
  const section = h("section", { id: "deployment", "aria-labelledby": "deployment-h" },
    h("h2", { id: "deployment-h" }, "Deployment ", h("code", { text: id })),
    h("p", { class: "row" }, "Status: ", statusBox),
    facts,
    h("h3", { text: "Jobs it changed (a continuous one restarts once)" }), changedJobs,
    h("h3", { text: "Jobs it removed" }), removed,
    h("h3", { text: "Log" }), followed.controls, followed.box);
  const stop = every(LIVE_MS, async () => {
    const record = await getJson(`/api/deployments/${enc(id)}`);
    showError(null);
    const finished = deployFinished(record);
    // Not `progress` beside it: the record is saved less often than its log is written, and
    // the log is right below.
    statusBox.replaceChildren(badge(deployStatus(record)), " ",
      record.active ? h("span", { class: "badge s-info", id: "deployment-active", text: "active" })
        : "");
    facts.replaceChildren(
      stat("Deployer", record.deployer || "—", "deployment-deployer"),
      stat("Author", record.author_email && record.author_email !== "N/A"
        ? `${record.author} <${record.author_email}>` : record.author || "—", "deployment-author"),
      stat("Message", record.message || "—", "deployment-message"),
      stat("Received", record.received_time ? localTime(record.received_time) : "—",
        "deployment-received"),
      stat("Ended", record.end_time ? localTime(record.end_time) : "not yet", "deployment-ended"),
      stat(finished ? "Took" : "Running for", deployDuration(record), "deployment-duration"));
    changedJobs.replaceChildren(jobList(record.changed_jobs, true));
    removed.replaceChildren(jobList(record.removed_jobs, false));
    await update(finished);
    if (finished) followed.state.textContent = `The deployment has ended: ${deployStatus(record)}.`;
    if (record.status !== lastStatus && lastStatus !== null) changed(record);
    lastStatus = record.status;
    return !finished;
  });
  return { id, section, stop };
}

// #/deployments/{id} shows that record; #/deployments shows the latest (Kudu's `latest`: the
// one under way, else the last to finish) and moves to the next one when it begins, wherever
// it came from (this page, the CLI, a GitHub action, a git push).
function deploymentsPage(selected) {
  const progress = uploadProgress();
  const message = h("p", { id: "deploy-message", role: "status" });
  const input = h("input", { type: "file", id: "site-zip", accept: ".zip,application/zip" });
  const clean = h("input", { type: "checkbox", id: "deploy-clean" });
  const body = h("tbody");
  const summary = h("p", { class: "muted", "aria-live": "polite", text: "Loading…" });
  const detailSlot = h("div");
  let current = null;
  let records = null; // until the first answer
  let followLatest = !selected;

  function show(id) {
    if (current) current.stop();
    current = id ? deploymentView(id, () => refresh().catch(showError)) : null;
    detailSlot.replaceChildren(current ? current.section : "");
    render();
  }

  function render() {
    const chosen = current ? current.id : null;
    if (records === null) return;
    summary.textContent = records.length > 1 ? `${records.length} deployments, newest first`
      : records.length ? "1 deployment" : "No deployments yet.";
    body.replaceChildren(...records.map((record) => h("tr", { class: "deployment",
      "data-id": record.id, "aria-current": record.id === chosen ? "true" : null },
      h("td", { "data-label": "Status" }, badge(deployStatus(record)),
        record.active ? [" ", h("span", { class: "badge s-info", text: "active" })] : ""),
      h("td", { "data-label": "Deployment" }, h("a", { href: `#/deployments/${enc(record.id)}`,
        title: record.id, "aria-label": `Deployment ${record.id}`, text: shortId(record.id) })),
      h("td", { "data-label": "Message", text: record.message || "" }),
      h("td", { "data-label": "Author", text: record.author || "" }),
      h("td", { "data-label": "Deployer", text: record.deployer || "" }),
      h("td", { "data-label": "Received" }, h("time", { datetime: record.received_time,
        title: record.received_time, text: ago(record.received_time) })),
      h("td", { "data-label": "Took", text: deployFinished(record) ? deployDuration(record)
        : "running" }))));
  }

  async function refresh() {
    records = await getJson("/api/deployments");
    if (followLatest && records.length) {
      const latest = await getJson("/api/deployments/latest"); // 202 while one is under way
      if (!current || current.id !== latest.id) show(latest.id);
    }
    showError(null);
    render();
  }

  async function deploySite(file) {
    if (!isZip(file)) {
      message.textContent = `Not deployed: ${file.name} is not a .zip file.`;
      return;
    }
    input.disabled = true;
    message.textContent = `Uploading ${file.name}…`;
    try {
      const query = `isAsync=true&deployer=dashboard${clean.checked ? "&clean=true" : ""}` +
        `&message=${enc(`${file.name} dropped on the dashboard`)}`;
      const xhr = await upload("POST", `/api/zipdeploy?${query}`, file,
        { "Content-Type": "application/zip" }, progress);
      // The 202's Location is Kudu's `latest` poll URL: the record the upload just made.
      const where = xhr.getResponseHeader("Location");
      if (!where) throw new Error("the daemon did not say where the deployment is");
      const record = await getJson(localPath(where));
      message.replaceChildren(`Uploaded ${file.name} as `, h("a", {
        href: `#/deployments/${enc(record.id)}`, text: `deployment ${shortId(record.id)}` }), ".");
      // The address names the record without rebuilding the page, which keeps the bar at 100 %.
      history.pushState(null, "", `#/deployments/${enc(record.id)}`);
      followLatest = false;
      show(record.id);
      await refresh();
    } catch (error) {
      message.textContent = `Not deployed: ${error.message}`;
    } finally {
      input.disabled = false;
      input.value = "";
    }
  }

  input.addEventListener("change", () => { if (input.files[0]) deploySite(input.files[0]); });
  leaving.push(acceptDrops(view, deploySite));
  leaving.push(() => { if (current) current.stop(); });
  setPage("Deployments", [],
    h("section", { id: "site-drop", "aria-labelledby": "deploy-h" },
      h("h2", { id: "deploy-h", text: "Deploy the site" }),
      h("p", { class: "muted", text: "Drop a zip of the site (wwwroot: App_Data/jobs/… inside " +
        "it) anywhere on this page, or choose one. Files the previous deployment left and this " +
        "zip lacks are deleted; other files stay unless the box is ticked." }),
      h("div", { class: "row" },
        h("label", { for: "site-zip" }, "Site zip to deploy", input),
        h("label", { for: "deploy-clean", class: "check" }, clean,
          "Clean: delete every file the zip does not have")),
      progress.box, message),
    detailSlot,
    h("section", { "aria-labelledby": "history-h" },
      h("h2", { id: "history-h", text: "History" }), summary,
      h("table", { class: "deployments" },
        h("thead", {}, h("tr", {}, ["Status", "Deployment", "Message", "Author", "Deployer",
          "Received", "Took"].map((t) => h("th", { scope: "col", text: t })))),
        body)));
  show(selected);
  every(REFRESH_MS, refresh);
}

// -- routing ---------------------------------------------------------------------------------

function route() {
  for (const end of leaving) end();
  leaving = [];
  const parts = (location.hash.replace(/^#\/?/, "") || "").split("/").map(decodeURIComponent);
  if (parts[0] === "job" && parts[1] === "triggered" && parts[2]) triggeredPage(parts[2]);
  else if (parts[0] === "job" && parts[1] === "continuous" && parts[2]) continuousPage(parts[2]);
  else if (parts[0] === "run" && parts[1] && parts[2]) runPage(parts[1], parts[2]);
  else if (parts[0] === "log" && parts[1]) logPage(parts[1]);
  else if (parts[0] === "deployments") deploymentsPage(parts[1] || null);
  else jobsPage();
  const section = parts[0] === "deployments" ? "#/deployments" : "#/";
  for (const link of document.querySelectorAll(".sections a")) {
    if (link.getAttribute("href") === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  view.focus({ preventScroll: true });
}

window.addEventListener("hashchange", route);
route();
