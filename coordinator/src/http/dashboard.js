// workq dashboard: polls the JSON API once a second and updates the tables in place.
// Rows are keyed (queue name, worker, item id) and reused between polls, so a button
// under the pointer is never replaced while someone clicks it. All text goes through
// textContent: queue names, errors and payloads are never parsed as HTML.
"use strict";

const POLL_MS = 1000;
const DEAD_SHOWN = 50;
// Dead items are fetched for at most this many queues per poll (most dead first).
const DEAD_QUEUES = 10;
const TOKEN_KEY = "workq.token";

const $ = (id) => document.getElementById(id);

let token = localStorage.getItem(TOKEN_KEY) || "";
let lastOk = 0;

// ---- API ----------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    const text = await response.text();
    try {
      message = JSON.parse(text).error || message;
    } catch (_) {
      if (text.trim()) message = text.trim();
    }
    throw new HttpError(response.status, message);
  }
  return response.json();
}

// ---- formatting ---------------------------------------------------------------------

const fmtInt = (n) => Number(n).toLocaleString("en-US");

function fmtDuration(ms) {
  if (!ms || ms < 0) return "–";
  const s = Math.round(ms / 1000);
  if (s < 60) return s + "s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + "m " + String(s % 60).padStart(2, "0") + "s";
  const h = Math.floor(m / 60);
  if (h < 48) return h + "h " + String(m % 60).padStart(2, "0") + "m";
  return Math.floor(h / 24) + "d " + (h % 24) + "h";
}

function fmtAgo(ms) {
  if (ms < 1000) return "just now";
  return fmtDuration(ms) + " ago";
}

function fmtRate(r) {
  if (!r) return "0";
  if (r >= 100) return r.toFixed(0);
  if (r >= 10) return r.toFixed(1);
  return r.toFixed(2);
}

// ---- keyed rows ---------------------------------------------------------------------

// Makes `tbody` hold one row per item, in order: rows are found by key and reused,
// created with `create(item)` when new, refreshed with `update(row, item)`.
function syncRows(tbody, items, key, create, update) {
  const existing = new Map();
  for (const row of Array.from(tbody.rows)) existing.set(row.dataset.key, row);
  let previous = null;
  for (const item of items) {
    const k = key(item);
    let row = existing.get(k);
    if (row) {
      existing.delete(k);
    } else {
      row = create(item);
      row.dataset.key = k;
    }
    update(row, item);
    const next = previous ? previous.nextSibling : tbody.firstChild;
    if (row !== next) tbody.insertBefore(row, next);
    previous = row;
  }
  for (const row of existing.values()) row.remove();
}

function cells(row, count, classes = []) {
  for (let i = 0; i < count; i++) {
    const td = row.insertCell();
    if (classes[i]) td.className = classes[i];
  }
  return row;
}

function setText(td, text) {
  if (td.textContent !== text) td.textContent = text;
}

function setNum(td, n, extraClass) {
  setText(td, fmtInt(n));
  td.className = "num" + (n === 0 ? " zero" : extraClass ? " " + extraClass : "");
}

// ---- queues -------------------------------------------------------------------------

function queueTotals(s) {
  // Every item accepted and not purged; done counts completions, which stay counted
  // after retention deletes the DONE items themselves.
  const done = s.total_completed;
  const open = s.ready + s.delayed + s.leased + s.dead;
  const total = Math.max(s.total_enqueued - s.total_purged, done + open);
  return { done, total };
}

function createQueueRow(q) {
  const row = document.createElement("tr");
  row.dataset.queue = q.name;
  cells(row, 10, ["name", "progress", "num", "num", "num", "num", "num", "num", "num", "num"]);
  const name = row.cells[0];
  name.append(document.createElement("span"));
  const bar = document.createElement("div");
  bar.className = "bar";
  for (const seg of ["done", "dead", "leased"]) {
    const span = document.createElement("span");
    span.className = "seg-" + seg;
    bar.append(span);
  }
  const label = document.createElement("div");
  label.className = "bar-label";
  row.cells[1].append(bar, label);
  return row;
}

function updateQueueRow(row, q) {
  const s = q.stats;
  const nameCell = row.cells[0];
  setText(nameCell.firstChild, q.name);
  for (const b of Array.from(nameCell.querySelectorAll(".badge"))) b.remove();
  const { done, total } = queueTotals(s);
  const finished = s.drained && s.sealed;
  const badges = [];
  if (finished) badges.push(["complete", "badge-done", "drained and sealed: the batch is finished"]);
  else {
    if (s.sealed) badges.push(["sealed", "badge-sealed", "no more items will be enqueued"]);
    if (s.drained) badges.push(["drained", "badge-drained", "no READY, DELAYED or LEASED items"]);
  }
  for (const [text, cls, title] of badges) {
    const b = document.createElement("span");
    b.className = "badge " + cls;
    b.textContent = text;
    b.title = title;
    nameCell.append(b);
  }

  const [segDone, segDead, segLeased] = row.cells[1].firstChild.children;
  const pct = (n) => (total > 0 ? (100 * n) / total : 0);
  segDone.style.width = pct(done) + "%";
  segDead.style.width = pct(s.dead) + "%";
  segLeased.style.width = pct(s.leased) + "%";
  const percent = total > 0 ? ((100 * done) / total).toFixed(1) : "0.0";
  setText(row.cells[1].lastChild, fmtInt(done) + " / " + fmtInt(total) + " done (" + percent + "%)");
  row.dataset.done = String(done);
  row.dataset.total = String(total);

  setNum(row.cells[2], s.ready);
  setNum(row.cells[3], s.delayed);
  setNum(row.cells[4], s.leased);
  setNum(row.cells[5], s.dead, "dead-nonzero");
  setText(row.cells[6], fmtRate(s.rate_10s) + " (" + fmtRate(s.rate_1m) + ")");
  setText(row.cells[7], s.drained ? "done" : s.eta_ms ? fmtDuration(s.eta_ms) : "–");
  setText(row.cells[8], s.ready ? fmtDuration(s.oldest_ready_age_ms) : "–");
  setNum(row.cells[9], s.workers);
}

// ---- workers ------------------------------------------------------------------------

function createWorkerRow(w) {
  const row = document.createElement("tr");
  row.dataset.worker = w.id;
  row.dataset.queue = w.queue;
  return cells(row, 6, ["name", "", "num", "ids", "num", "num"]);
}

function updateWorkerRow(row, w, now) {
  setText(row.cells[0], w.id);
  setText(row.cells[1], w.queue);
  setNum(row.cells[2], w.in_flight);
  const shown = w.holding.map((id) => "#" + id).join(" ");
  setText(row.cells[3], shown + (w.in_flight > w.holding.length ? " …" : ""));
  setNum(row.cells[4], w.completed);
  const age = Math.max(0, now - w.last_seen_ms);
  setText(row.cells[5], fmtAgo(age));
  row.cells[5].className = "num " + (age < 10000 ? "seen-fresh" : age < 60000 ? "seen-idle" : "seen-stale");
  row.dataset.inFlight = String(w.in_flight);
  row.dataset.completed = String(w.completed);
}

// ---- schedules ----------------------------------------------------------------------

function createScheduleRow(s) {
  const row = document.createElement("tr");
  row.dataset.schedule = s.name;
  return cells(row, 7, ["name", "", "cron", "", "", "result", "num"]);
}

// What a run did, in a few words, and the class that colours it.
function runResult(run) {
  switch (run.outcome) {
    case "enqueued":
      return ["enqueued " + fmtInt(run.items) + (run.replaced ? ", replaced " + fmtInt(run.replaced) : ""), "run-ok"];
    case "skipped":
      return ["skipped: previous run unfinished", "run-skipped"];
    default:
      return [run.outcome + (run.detail ? ": " + run.detail : ""), "run-bad"];
  }
}

function updateScheduleRow(row, s, now) {
  setText(row.cells[0], s.name + (s.suspended ? " (suspended)" : ""));
  setText(row.cells[1], s.queue);
  setText(row.cells[2], s.cron + (s.time_zone === "UTC" ? "" : " " + s.time_zone));
  setText(row.cells[3], s.policy);
  const last = s.runs[0];
  setText(row.cells[4], last ? fmtAgo(Math.max(0, now - last.scheduled_ms)) : "–");
  const [text, cls] = last ? runResult(last) : ["–", ""];
  setText(row.cells[5], text);
  row.cells[5].className = "result " + cls;
  setText(row.cells[6], s.next_run_ms ? "in " + fmtDuration(Math.max(1000, s.next_run_ms - now)) : "–");
  row.dataset.outcome = last ? last.outcome : "";
  row.dataset.suspended = String(s.suspended);
}

// ---- dead items ---------------------------------------------------------------------

function createDeadRow(item) {
  const row = document.createElement("tr");
  row.dataset.queue = item.queue;
  row.dataset.item = String(item.id);
  cells(row, 7, ["", "num", "num", "error-text", "payload", "", ""]);
  const button = document.createElement("button");
  button.type = "button";
  button.className = "small requeue";
  button.textContent = "Requeue";
  button.dataset.queue = item.queue;
  button.dataset.id = String(item.id);
  button.addEventListener("click", () => requeue(item.queue, [item.id], button));
  row.cells[6].append(button);
  return row;
}

function updateDeadRow(row, item) {
  setText(row.cells[0], item.queue);
  setText(row.cells[1], "#" + item.id);
  setText(row.cells[2], String(item.attempts));
  setText(row.cells[3], item.last_error || "(no error text)");
  setText(row.cells[4], item.payload_preview + (item.payload_bytes > 0 ? "" : "(empty)"));
  setText(row.cells[5], item.worker || "–");
}

async function requeue(queue, ids, button) {
  if (button) button.disabled = true;
  try {
    const body = ids ? { ids } : { all_dead: true };
    await api("/api/v1/queues/" + encodeURIComponent(queue) + "/requeue", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    await refresh();
  } catch (e) {
    showError("requeue failed: " + e.message);
    if (button) button.disabled = false;
  }
}

// One "requeue all" button per queue that has dead items.
function syncActions(withDead) {
  const box = $("dead-actions");
  const existing = new Map(Array.from(box.children).map((b) => [b.dataset.queue, b]));
  for (const q of withDead) {
    let button = existing.get(q.name);
    existing.delete(q.name);
    if (!button) {
      button = document.createElement("button");
      button.type = "button";
      button.className = "small secondary requeue-all";
      button.dataset.queue = q.name;
      button.addEventListener("click", () => requeue(q.name, null, button));
      box.append(button);
    }
    button.disabled = false;
    setText(button, "Requeue all " + fmtInt(q.stats.dead) + " dead in " + q.name);
  }
  for (const button of existing.values()) button.remove();
}

// ---- polling ------------------------------------------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setConn(state, text) {
  const conn = $("conn");
  conn.className = "conn conn-" + state;
  conn.textContent = text;
}

let refreshing = null;

function refresh() {
  if (!refreshing) {
    refreshing = poll().finally(() => {
      refreshing = null;
    });
  }
  return refreshing;
}

async function poll() {
  try {
    const [list, workers, schedules] = await Promise.all([
      api("/api/v1/queues"),
      api("/api/v1/workers"),
      api("/api/v1/schedules"),
    ]);
    const withDead = list.queues.filter((q) => q.stats.dead > 0);
    const fetched = withDead
      .slice()
      .sort((a, b) => b.stats.dead - a.stats.dead)
      .slice(0, DEAD_QUEUES)
      .sort((a, b) => (a.name < b.name ? -1 : 1));
    const deadPages = await Promise.all(
      fetched.map((q) =>
        api("/api/v1/queues/" + encodeURIComponent(q.name) + "/items?state=dead&limit=" + DEAD_SHOWN)
          .then((page) => page.items.map((item) => Object.assign({ queue: q.name }, item)))
          .catch((e) => (e.status === 404 ? [] : Promise.reject(e))),
      ),
    );
    render(list, workers, schedules, deadPages.flat(), withDead);
    lastOk = Date.now();
    setConn("live", "live");
    showError("");
    $("token-panel").hidden = $("token-panel").dataset.open !== "1";
  } catch (e) {
    if (e.status === 401) {
      setConn("down", "token needed");
      openTokenPanel();
      showError(token ? "The token was refused: " + e.message : "Enter the coordinator's token to see its queues.");
    } else {
      setConn("down", "unreachable");
      showError("Cannot reach the coordinator: " + e.message + (lastOk ? " (showing data from " + fmtAgo(Date.now() - lastOk) + ")" : ""));
    }
  }
}

function render(list, workers, schedules, dead, withDead) {
  const queues = list.queues;
  syncRows($("queues").tBodies[0], queues, (q) => q.name, createQueueRow, updateQueueRow);
  $("no-queues").hidden = queues.length > 0;
  $("queue-count").textContent = "(" + queues.length + ")";

  const now = workers.now_ms;
  syncRows(
    $("workers").tBodies[0],
    workers.workers,
    (w) => w.queue + "\u0000" + w.id,
    createWorkerRow,
    (row, w) => updateWorkerRow(row, w, now),
  );
  $("no-workers").hidden = workers.workers.length > 0;
  $("worker-count").textContent = "(" + workers.workers.length + ")";

  syncRows(
    $("schedules").tBodies[0],
    schedules.schedules,
    (s) => s.name,
    createScheduleRow,
    (row, s) => updateScheduleRow(row, s, schedules.now_ms),
  );
  $("no-schedules").hidden = schedules.schedules.length > 0;
  $("schedule-count").textContent = "(" + schedules.schedules.length + ")";

  syncRows($("dead").tBodies[0], dead, (d) => d.queue + "\u0000" + d.id, createDeadRow, updateDeadRow);
  const totalDead = withDead.reduce((n, q) => n + q.stats.dead, 0);
  $("no-dead").hidden = totalDead > 0;
  $("dead-count").textContent =
    "(" + fmtInt(totalDead) + (totalDead > dead.length ? ", first " + dead.length + " shown" : "") + ")";
  syncActions(withDead);
  $("updated").textContent = "updated " + new Date(list.now_ms).toLocaleTimeString();
}

// ---- token --------------------------------------------------------------------------

function openTokenPanel() {
  const panel = $("token-panel");
  panel.dataset.open = "1";
  panel.hidden = false;
}

$("token-toggle").addEventListener("click", () => {
  const panel = $("token-panel");
  const open = panel.hidden;
  panel.dataset.open = open ? "1" : "0";
  panel.hidden = !open;
  if (open) $("token-input").focus();
});

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token-input").value.trim();
  $("token-input").value = "";
  if (token) localStorage.setItem(TOKEN_KEY, token);
  else localStorage.removeItem(TOKEN_KEY);
  $("token-panel").dataset.open = "0";
  refresh();
});

$("token-clear").addEventListener("click", () => {
  token = "";
  localStorage.removeItem(TOKEN_KEY);
  refresh();
});

refresh();
setInterval(refresh, POLL_MS);
