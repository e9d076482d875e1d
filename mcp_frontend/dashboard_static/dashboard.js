// The dashboard's one script: polls the fleet snapshot, keeps five minutes of
// samples, works out rates from successive counters and draws them. Every
// string from the server goes in as textContent or an attribute, never markup.
"use strict";

const POLL_MS = 2000;
const WINDOW_MS = 5 * 60 * 1000;
// A fresh page's charts span at least a minute, so a few samples are not a sliver.
const MIN_SPAN_MS = 60 * 1000;
// Shown rates span about 10 s: one 2 s step is too jumpy to read.
const RATE_SPAN_MS = 10 * 1000;
const REQUEST_TIMEOUT_MS = 10 * 1000;
const SNAPSHOT_URL = "dashboard/api/snapshot";
const SVG_NS = "http://www.w3.org/2000/svg";
const CHART_W = 600;
const CHART_H = 120;
const CHART_PAD = 6;

const samples = []; // {atMs, depth, totals}, oldest first

function byId(id) {
  return document.getElementById(id);
}

function show(id, text) {
  byId(id).textContent = text;
}

function count(n) {
  return n.toLocaleString("en-US");
}

function perSecond(value) {
  if (value === null) return "–";
  return value < 10 ? value.toFixed(1) : count(Math.round(value));
}

function record(snap) {
  const atMs = Date.parse(snap.at);
  const last = samples[samples.length - 1];
  // Counters never go down unless Redis lost them; older samples would give
  // negative rates, so start again.
  const reset = last && Object.keys(snap.totals).some((k) => snap.totals[k] < last.totals[k]);
  if (reset) samples.length = 0;
  else if (last && atMs <= last.atMs) return;
  samples.push({ atMs, depth: snap.queue_depth, totals: snap.totals });
  while (samples[0].atMs < atMs - WINDOW_MS) samples.shift();
}

function rate(name) {
  if (samples.length < 2) return null;
  const newest = samples[samples.length - 1];
  let base = samples[samples.length - 2];
  for (let i = samples.length - 3; i >= 0 && newest.atMs - samples[i].atMs <= RATE_SPAN_MS; i--) {
    base = samples[i];
  }
  return (newest.totals[name] - base.totals[name]) / ((newest.atMs - base.atMs) / 1000);
}

function appliedSeries() {
  const points = [];
  for (let i = 1; i < samples.length; i++) {
    const before = samples[i - 1];
    const after = samples[i];
    const seconds = (after.atMs - before.atMs) / 1000;
    points.push({ atMs: after.atMs, value: (after.totals.applied - before.totals.applied) / seconds });
  }
  return points;
}

function clock(iso) {
  return new Date(iso).toLocaleTimeString([], { hour12: false });
}

function svg(name, attributes) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  return node;
}

function draw(chartId, peakId, points, nowMs, format) {
  const chart = byId(chartId);
  const peak = Math.max(0, ...points.map((p) => p.value));
  const top = Math.max(1, peak); // an idle fleet draws a flat line at the bottom, not mid-air
  const spanMs = Math.min(WINDOW_MS, Math.max(MIN_SPAN_MS, nowMs - samples[0].atMs));
  const x = (atMs) => CHART_W - ((nowMs - atMs) / spanMs) * CHART_W;
  const y = (value) => CHART_H - CHART_PAD - (value / top) * (CHART_H - 2 * CHART_PAD);
  const nodes = [];
  for (const fraction of [0, 0.5, 1]) {
    const level = y(top * fraction);
    nodes.push(svg("line", { class: "grid", x1: 0, x2: CHART_W, y1: level, y2: level }));
  }
  if (points.length > 0) {
    const line = points.map((p) => `${x(p.atMs).toFixed(1)},${y(p.value).toFixed(1)}`);
    const first = x(points[0].atMs).toFixed(1);
    const last = x(points[points.length - 1].atMs).toFixed(1);
    const floor = y(0).toFixed(1);
    nodes.push(svg("polygon", { class: "area", points: `${first},${floor} ${line.join(" ")} ${last},${floor}` }));
    nodes.push(svg("polyline", { class: "line", points: line.join(" ") }));
    const [lastX, lastY] = line[line.length - 1].split(",");
    nodes.push(svg("circle", { class: "dot", cx: lastX, cy: lastY, r: 3 }));
  }
  chart.replaceChildren(...nodes);
  const minutes = Math.max(1, Math.round(spanMs / MIN_SPAN_MS));
  show(peakId, points.length > 0 ? `last ${minutes} min · peak ${format(peak)}` : "");
}

function cell(text, title) {
  const td = document.createElement("td");
  td.textContent = text;
  if (title) td.setAttribute("title", title);
  return td;
}

function showFailures(failures) {
  const rows = failures.map((f) => {
    const tr = document.createElement("tr");
    const finished = f.finished_at ? clock(f.finished_at) : "–";
    tr.append(
      cell(finished, f.finished_at || ""),
      cell(f.status),
      cell(f.client_id),
      cell(`${f.run_type} ${f.run_id.slice(0, 8)}…`, f.run_id),
      cell(f.state),
      cell(f.reason),
      cell(f.job_id.slice(0, 8), f.job_id),
    );
    tr.cells[5].className = "reason";
    return tr;
  });
  if (rows.length === 0) {
    const empty = cell("none");
    empty.colSpan = 7;
    empty.className = "empty";
    rows.push(document.createElement("tr"));
    rows[0].append(empty);
  }
  byId("failures").replaceChildren(...rows);
}

function render(snap) {
  show("queue-depth", count(snap.queue_depth));
  for (const name of ["queued", "running", "waiting"]) show(`live-${name}`, count(snap.live[name]));
  for (const name of ["enqueued", "applied", "rejected", "failed", "cancelled"]) {
    show(`${name}-total`, count(snap.totals[name]));
  }
  for (const name of ["applied", "rejected", "failed"]) show(`${name}-rate`, perSecond(rate(name)));
  show("prefect-ms", snap.prefect_ms === null ? "–" : `${Math.round(snap.prefect_ms)} ms`);
  show("workers-alive", count(snap.workers_alive));
  const nowMs = Date.parse(snap.at);
  draw("depth-chart", "depth-peak", samples.map((s) => ({ atMs: s.atMs, value: s.depth })), nowMs, count);
  draw("rate-chart", "rate-peak", appliedSeries(), nowMs, perSecond);
  showFailures(snap.failures);
}

function status(state, text) {
  const node = byId("status");
  node.dataset.state = state;
  node.textContent = text;
}

async function poll() {
  try {
    const response = await fetch(SNAPSHOT_URL, {
      cache: "no-store",
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const snap = await response.json();
    record(snap);
    render(snap);
    status("live", `live · updated ${clock(snap.at)}`);
  } catch (error) {
    status("error", `no snapshot (${error.message}); retrying every ${POLL_MS / 1000} s`);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
