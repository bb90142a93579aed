// busted's page. Every value from the monitor is attacker-controlled (process names, SNI, models,
// paths): cells are written with textContent only, never as HTML; the server's CSP forbids
// inline script. Live updates come over one EventSource, filtered on the server.
"use strict";

const MAX_ROWS = 500;
let view = "calls";
let source = null;
let chart = null;
let reloadTimer = null;

const $ = (sel) => document.querySelector(sel);

function filterQuery() {
  const p = new URLSearchParams();
  for (const el of $("#filters").elements) {
    if (el.name && el.value.trim()) p.set(el.name, el.value.trim());
  }
  return p;
}

const fmt = {
  time: (t) => (t ? new Date(t * 1000).toLocaleTimeString() : ""),
  int: (n) => (n === null || n === undefined ? "" : Number(n).toLocaleString()),
  ms: (ns) => (ns === null || ns === undefined ? "" : (ns / 1e6).toFixed(ns < 1e7 ? 1 : 0) + " ms"),
  usd: (c) => (c === null || c === undefined ? "" : "$" + Number(c).toFixed(c < 0.01 ? 5 : 4)),
  bytes: (b) => {
    if (b === null || b === undefined) return "";
    const u = ["B", "KiB", "MiB", "GiB"]; let i = 0; let v = Number(b);
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : String(v)) + " " + u[i];
  },
  yes: (b) => (b === true ? "yes" : b === false ? "no" : ""),
};

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

function who(d) {
  return (d.comm || "?") + (d.pid !== null && d.pid !== undefined ? " [" + d.pid + "]" : "");
}

const ROWS = {
  calls: (d) => [
    cell(fmt.time(d.wall_time)), cell(who(d)), cell(d.agent), cell(d.provider || d.hostname),
    cell(d.response_model || d.request_model), cell(fmt.yes(d.stream)),
    cell(fmt.int(d.input_tokens), "n"), cell(fmt.int(d.output_tokens), "n"),
    cell(fmt.int((d.cache_read_tokens || 0) + (d.cache_write_tokens || 0) || null), "n"),
    cell(fmt.ms(d.time_to_first_token_ns), "n"), cell(fmt.ms(d.duration_ns), "n"),
    cell((d.status === null || d.status === undefined ? "" : d.status) + (d.complete === false ? " (cut)" : ""),
         d.status >= 400 || d.complete === false ? "bad" : ""),
    cell(fmt.usd(d.cost_usd), "n"),
  ],
  flows: (d) => [
    cell(fmt.time(d.last_seen)), cell(d.comm), cell(d.pid), cell(d.hostname || d.daddr), cell(d.dport),
    cell(d.provider), cell(d.evidence), cell(fmt.int(d.flows), "n"), cell(fmt.bytes(d.bytes_sent), "n"),
    cell(fmt.bytes(d.bytes_received), "n"),
  ],
  decisions: (d) => [
    cell(fmt.time(d.wall_time)), cell(who(d)), cell(d.uid),
    cell((d.hostname || d.daddr || "") + (d.dport ? ":" + d.dport : "")),
    cell(d.action, d.action === "deny" ? "bad" : ""), cell(fmt.yes(d.enforced)), cell(d.rule), cell(d.point),
  ],
  mcp: (d) => [
    cell(fmt.time(d.wall_time)), cell(who(d)), cell(fmt.yes(d.direction_sent)), cell(d.jsonrpc_method),
    cell(d.tool), cell(d.jsonrpc_id), cell(d.session_id), cell(d.error_code),
  ],
  losses: (d) => [cell(fmt.time(d.wall_time)), cell(d.where), cell(fmt.int(d.count), "n"), cell(d.detail)],
  budgets: (d) => [
    cell(d.budget), cell(d.per), cell(d.scope), cell(fmt.int(d.tokens), "n"), cell(fmt.int(d.limit_tokens), "n"),
    cell(fmt.usd(d.usd), "n"), cell(fmt.usd(d.limit_usd), "n"), cell(fmt.time(d.window_end)),
    cell(d.exceeded ? (d.enforced ? "refused" : "exceeded") : "ok", d.exceeded ? "bad" : ""),
  ],
};

function row(kind, d, isNew) {
  const tr = document.createElement("tr");
  for (const td of ROWS[kind](d)) tr.appendChild(td);
  if (isNew) tr.className = "new";
  if (kind === "calls") tr.addEventListener("click", () => showDetail(d));
  return tr;
}

function fill(kind, list) {
  const body = document.querySelector("#" + kind + " tbody");
  const rows = list.map((d) => row(kind, d, false));
  body.replaceChildren(...rows);
}

function prepend(kind, d) {
  const body = document.querySelector("#" + kind + " tbody");
  body.insertBefore(row(kind, d, true), body.firstChild);
  while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
}

function showDetail(d) {
  const keys = ["flow_id", "pid", "ppid", "uid", "comm", "exe", "cmdline", "agent", "agent_evidence", "container_id",
    "hostname", "provider", "evidence", "saddr", "sport", "daddr", "dport", "api", "method", "path",
    "http_version", "request_model", "response_model", "response_id", "finish_reason", "ttft_source", "user_agent", "price_source",
    "ancestry"];
  const lines = [];
  for (const k of keys) {
    if (d[k] === null || d[k] === undefined) continue;
    const v = typeof d[k] === "object" ? JSON.stringify(d[k]) : String(d[k]);
    lines.push(k + ": " + v);
  }
  const box = $("#detail");
  box.textContent = lines.join("\n");
  box.classList.remove("hidden");
}

async function getJSON(path) {
  const r = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

async function load() {
  const q = filterQuery().toString();
  try {
    if (view === "spend") return await loadSpend();
    if (view === "health") return await loadHealth();
    const list = await getJSON("/api/" + view + (q ? "?" + q : ""));
    fill(view, list);
  } catch (e) {
    console.error(e);
  }
}

async function loadHealth() {
  const h = await getJSON("/api/health");
  const body = document.querySelector("#health tbody");
  const rows = [];
  const add = (k, v) => { const tr = document.createElement("tr"); tr.appendChild(cell(k)); tr.appendChild(cell(v)); rows.push(tr); };
  add("events shown", fmt.int(h.seen));
  add("up", Math.round(h.uptime_s) + " s");
  add("open tabs", h.tabs);
  add("events dropped to slow tabs", fmt.int(h.tabs_dropped));
  add("events out of the page's window", fmt.int(h.window_dropped));
  add("flow groups evicted (least recently seen)", fmt.int(h.flows_evicted));
  if (h.monitor) {
    add("monitor events", fmt.int(h.monitor.events));
    add("queue depth", fmt.int(h.monitor.queue_depth));
    add("open flows", fmt.int(h.monitor.open_flows));
    const lost = Object.entries(h.monitor.lost || {});
    add("lost (by place)", lost.length ? lost.map(([k, v]) => k + "=" + v).join(", ") : "none");
    add("plan", Object.entries(h.monitor.plan || {}).map(([k, v]) => k + "=" + v).join(", "));
    if (h.monitor.page_dropped !== undefined) add("events the page fell behind on", fmt.int(h.monitor.page_dropped));
  }
  body.replaceChildren(...rows);
  fill("budgets", await getJSON("/api/budgets"));
  fill("losses", await getJSON("/api/losses"));
}

async function loadSpend() {
  const q = filterQuery();
  q.set("by", $("#spend-by").value);
  q.set("window", $("#spend-window").value);
  const s = await getJSON("/api/spend?" + q.toString());
  const body = document.querySelector("#spend tbody");
  body.replaceChildren(...s.totals.map((t) => {
    const tr = document.createElement("tr");
    tr.append(cell(t.group), cell(fmt.int(t.calls), "n"), cell(fmt.int(t.input_tokens), "n"),
              cell(fmt.int(t.output_tokens), "n"), cell(fmt.usd(t.cost_usd), "n"));
    return tr;
  }));
  const metric = $("#spend-metric").value === "tokens" ? "tokens" : "series";
  const per = s[metric];
  const names = Object.keys(per);
  const usd = metric === "series";
  const tick = (v) => (usd ? "$" + (v === 0 ? "0" : v.toPrecision(2)) : Number(v).toLocaleString());
  const colors = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563", "#9ca3af"];
  const data = [s.t, ...names.map((n) => per[n])];
  const opts = {
    width: Math.max(400, $("#chart").clientWidth || 800), height: 280,
    series: [{}, ...names.map((n, i) => ({ label: n, stroke: colors[i % colors.length], width: 2,
      value: (u, v) => (v === null ? "" : tick(v)) }))],
    axes: [{}, { label: (usd ? "USD" : "tokens") + " per " + stepText(s.step_s), size: 80,
                 values: (u, vals) => vals.map(tick) }],
    scales: { x: { time: true } },
  };
  if (chart) chart.destroy();
  chart = typeof uPlot === "function" ? new uPlot(opts, data, $("#chart")) : null;
}

function stepText(sec) {
  if (sec < 60) return Math.round(sec) + " s";
  if (sec < 3600) return Math.round(sec / 60) + " min";
  return Math.round(sec / 3600) + " h";
}

function scheduleReload(ms) {
  if (reloadTimer) return;
  reloadTimer = setTimeout(() => { reloadTimer = null; load(); }, ms);
}

const LIVE = { llm_call: "calls", mcp_message: "mcp", policy_decision: "decisions", events_lost: "losses" };

function connect() {
  if (source) source.close();
  const q = filterQuery().toString();
  source = new EventSource("/api/stream" + (q ? "?" + q : ""));
  source.onopen = () => { $("#live").className = "live on"; };
  source.onerror = () => { $("#live").className = "live off"; };
  source.addEventListener("dropped", () => scheduleReload(500));
  source.onmessage = (m) => {
    let d;
    try { d = JSON.parse(m.data); } catch (e) { return; }
    const kind = LIVE[d.kind];
    if (kind && kind === view && ROWS[kind]) prepend(kind, d);
    else if (view === "spend" && d.kind === "llm_call") scheduleReload(1000);
    else if (view === "health" && d.kind === "events_lost") scheduleReload(1000);
  };
}

function show(v) {
  view = v;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.view === v);
  for (const s of document.querySelectorAll(".view")) s.classList.toggle("active", s.id === "view-" + v);
  load();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.view));
  $("#filters").addEventListener("submit", (e) => { e.preventDefault(); load(); connect(); });
  $("#filters").addEventListener("reset", () => setTimeout(() => { load(); connect(); }, 0));
  $("#spend-by").addEventListener("change", load);
  $("#spend-window").addEventListener("change", load);
  $("#spend-metric").addEventListener("change", load);
  const hash = location.hash.replace("#", "");
  show(ROWS[hash] || hash === "spend" || hash === "health" ? hash : "calls");
  connect();
  setInterval(() => { if (view === "health" || view === "flows") load(); }, 3000);
});
