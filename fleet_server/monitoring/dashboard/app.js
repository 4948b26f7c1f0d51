// edgefleet dashboard: plain JS, no build step. Every figure comes from the operator API
// with the operator token, kept in sessionStorage (gone when the tab closes). Device data
// is untrusted: it is only ever put in the page as text (textContent), never as HTML.
"use strict";

// Refresh every 3 s, or 5x what the last refresh took if longer: a large fleet's page
// must not keep the server busy answering it.
const POLL_MS = 3000;
const TOKEN_KEY = "edgefleet.token";

// The pages. A page is {id, title, nav, render(params) -> Promise<Node>}; `nav: false`
// keeps it out of the menu (reached by a link). The rollouts and audit pages plug in
// here: add {id: "rollouts", title: "Rollouts", nav: true, render: renderRollouts}.
const PAGES = [
  {id: "overview", title: "Fleet", nav: true, render: renderOverview},
  {id: "device", title: "Device", nav: false, render: renderDevice},
  {id: "alerts", title: "Alerts", nav: true, render: renderAlerts},
  {id: "rollouts", title: "Rollouts", nav: true, render: renderRollouts},
  {id: "events", title: "Events", nav: true, render: renderEvents},
  {id: "audit", title: "Audit", nav: true, render: renderAudit},
];

// --- plumbing --------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

class Unauthorized extends Error {}

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(path, {headers: {Authorization: "Bearer " + token}});
  if (response.status === 401) throw new Unauthorized("the token was refused");
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const page = PAGES.find((p) => p.id === parts[0]) || PAGES[0];
  return {page, params: parts.slice(1)};
}

function ago(at) {
  if (at === null || at === undefined) return "never";
  const s = Math.max(0, Date.now() / 1000 - at);
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 172800) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function num(value, digits) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

function pct(value) {
  return value === null || value === undefined ? "-" : (100 * value).toFixed(1) + "%";
}

function table(headers, rows, empty) {
  if (!rows.length) return el("p", {class: "muted"}, empty);
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) =>
      c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c))))));
}

function numCell(text, cls) {
  return el("td", {class: "num " + (cls || "")}, text);
}

// A line chart of one or two series over time: points are [{x, y}], y may be null.
function chart(title, series, unit) {
  const box = el("div", {class: "chart", "data-chart": title}, el("h3", {}, title));
  const all = series.flatMap((s) => s.points.filter((p) => p.y !== null));
  if (!all.length) {
    box.append(el("div", {class: "empty"}, "no data in this window"));
    return box;
  }
  const ns = "http://www.w3.org/2000/svg";
  const W = 320, H = 140, L = 40, B = 16;
  const xs = all.map((p) => p.x), ys = all.map((p) => p.y);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 60);
  const y1 = Math.max(...ys, 1e-9);
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const colors = ["#2856d8", "#c0362c"];
  series.forEach((s, i) => {
    const pts = s.points.filter((p) => p.y !== null).map((p) =>
      `${L + (W - L - 4) * (p.x - x0) / (x1 - x0)},${(H - B) - (H - B - 8) * p.y / y1}`);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", pts.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", colors[i % 2]);
    line.setAttribute("stroke-width", "1.5");
    svg.append(line);
  });
  const label = (text, x, y) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", y);
    t.setAttribute("font-size", "9"); t.setAttribute("fill", "#6b7385");
    t.textContent = text;
    svg.append(t);
  };
  label(`${num(y1, 3)} ${unit}`, 0, 12);
  label("0", 0, H - B);
  label(new Date(x0 * 1000).toLocaleTimeString(), L, H - 2);
  label(new Date(x1 * 1000).toLocaleTimeString(), W - 60, H - 2);
  box.append(svg, el("div", {class: "muted"},
    series.map((s, i) => el("span", {style: `color:${colors[i % 2]}`}, s.name + "  "))));
  return box;
}

function alertBox(a) {
  return el("div", {class: "alert", "data-alert": a.kind + "/" + a.key},
    el("strong", {}, `${a.kind} ${a.key}`), " ", a.summary,
    el("span", {class: "muted"}, ` (since ${ago(a.first_at)}, raised ${a.raised}x)`));
}

// --- pages -----------------------------------------------------------------------------

async function renderOverview() {
  const [overview, devices, metrics] = await Promise.all([
    api("/api/overview"), api("/api/devices"),
    api("/api/metrics?window=3600&by=group,model,version")]);
  const card = (value, label, cls) => el("div", {class: "card"},
    el("div", {class: "value " + (cls || "")}, value), el("div", {class: "label"}, label));
  const alerts = overview.alerts_firing;
  const groups = Object.entries(overview.groups).map(([name, g]) => [
    name, numCell(g.devices), numCell(g.online), numCell(pct(g.convergence)),
    Object.entries(g.running).map(([model, versions]) => model + " " +
      Object.entries(versions).map(([v, n]) => `v${v}\u00d7${n}`).join(" ")).join("; ") || "-",
    Object.entries(g.desired).map(([m, v]) => `${m} v${v}`).join("; ") || "-"]);
  const models = metrics.totals.map((t) => [
    t.group, t.model, "v" + t.version, numCell(t.devices), numCell(t.requests),
    numCell(pct(t.error_rate), t.error_rate > 0.05 ? "bad" : ""),
    numCell(num(t.latency_ms.p50, 3)), numCell(num(t.latency_ms.p99, 3)),
    numCell(num(t.drift.psi_max, 3), t.drift.psi_max > 0.25 ? "bad" : "")]);
  const deviceRows = devices.devices.map((d) => [
    el("a", {href: "#/device/" + encodeURIComponent(d.id)}, d.id), d.group, d.profile,
    el("td", {class: d.online ? "ok" : "bad"}, d.online ? "online" : "offline"),
    el("td", {class: d.converged ? "ok" : "warn"}, d.converged ? "yes" : "no"),
    ago(d.last_seen)]);
  return el("div", {},
    el("h1", {}, "Fleet"),
    el("div", {class: "cards"},
      card(overview.devices, "devices"),
      card(overview.online, "online", overview.online < overview.devices ? "warn" : "ok"),
      card(overview.converged, "converged"),
      card(alerts.length, "alerts firing", alerts.length ? "bad" : "ok"),
      card(num(overview.ingest.lag_s, 3) + " s", "ingest lag")),
    el("h2", {}, "Alerts"), alerts.length ? alerts.map(alertBox) :
      el("p", {class: "muted"}, "none firing"),
    el("h2", {}, "Groups: versions and convergence"),
    table(["group", "devices", "online", "converged", "running", "desired"], groups,
          "no devices enrolled"),
    el("h2", {}, "Models, last hour"),
    table(["group", "model", "version", "devices", "requests", "errors", "p50 ms", "p99 ms",
           "drift PSI"], models, "no telemetry in the last hour"),
    el("h2", {}, "Devices"),
    table(["device", "group", "profile", "online", "converged", "last seen"], deviceRows,
          "no devices enrolled"));
}

async function renderDevice(params) {
  const id = params[0] || "";
  const q = "device=" + encodeURIComponent(id);
  const [device, series, events] = await Promise.all([
    api("/api/devices/" + encodeURIComponent(id)),
    api("/api/metrics/series?window=3600&step=60&" + q),
    api("/api/events?order=newest&limit=50&" + q)]);
  const pts = (f) => series.points.map((p) => ({x: p.at, y: f(p)}));
  const desired = Object.entries(device.desired).map(([m, d]) => [m, "v" + d.version,
    d.bundle_sha256.slice(0, 16)]);
  const reported = Object.entries(device.reported.models || {}).map(([m, r]) => [
    m, "v" + r.version, r.state, (r.bundle_sha256 || "").slice(0, 16)]);
  const installs = events.events.filter((e) => e.kind.startsWith("agent.install"))
    .reverse().map((e) => [new Date((e.detail.device_at || e.at) * 1000).toLocaleString(),
      e.kind.replace(/^agent\./, ""), JSON.stringify(e.detail).slice(0, 160)]);
  return el("div", {},
    el("h1", {}, "Device " + device.id),
    el("p", {}, `group ${device.group} \u00b7 profile ${device.profile} \u00b7 `,
      el("span", {class: device.online ? "ok" : "bad"}, device.online ? "online" : "offline"),
      ` \u00b7 last seen ${ago(device.last_seen)} \u00b7 converged `,
      el("span", {class: device.converged ? "ok" : "warn"}, device.converged ? "yes" : "no")),
    el("h2", {}, "Versions"),
    table(["model", "desired", "bundle"], desired, "nothing desired"),
    el("br"),
    table(["model", "reported", "state", "bundle"], reported, "nothing reported yet"),
    el("h2", {}, "Last hour"),
    el("div", {class: "charts"},
      chart("Latency (ms)", [{name: "p50", points: pts((p) => p.latency_ms.p50)},
                             {name: "p99", points: pts((p) => p.latency_ms.p99)}], "ms"),
      chart("Requests and errors per minute", [
        {name: "requests", points: pts((p) => p.requests)},
        {name: "errors", points: pts((p) => p.errors)}], ""),
      chart("Drift", [{name: "PSI (max)", points: pts((p) => p.drift.psi_max)},
                      {name: "KS (max)", points: pts((p) => p.drift.ks_max)}], "")),
    el("h2", {}, "Install history"),
    table(["at", "transition", "detail"], installs, "no installs in the recent events"));
}

async function renderAlerts() {
  const all = await api("/api/alerts?state=all&limit=200");
  const rows = all.alerts.map((a) => [
    el("td", {class: a.state === "firing" ? "bad" : "ok"}, a.state), a.kind, a.key,
    a.summary, ago(a.first_at), numCell(a.raised),
    a.resolved_at ? ago(a.resolved_at) : "-"]);
  return el("div", {}, el("h1", {}, "Alerts"),
    table(["state", "kind", "key", "summary", "since", "raised", "resolved"], rows,
          "no alerts yet"));
}

async function renderRollouts() {
  const listed = await api("/api/rollouts");
  // The list leaves out per-step detail; the newest few are fetched whole.
  const details = await Promise.all(listed.rollouts.slice(0, 10).map(
    (r) => api("/api/rollouts/" + encodeURIComponent(r.id))));
  return el("div", {}, el("h1", {}, "Rollouts"),
    details.length ? details.map(renderRollout) : el("p", {class: "muted"}, "no rollouts yet"));
}

function renderRollout(r) {
  const tone = r.state === "succeeded" ? "ok"
    : (r.state === "halted" || r.state === "aborted") ? "bad" : "warn";
  const steps = (r.steps || []).map((s) => [s.name, numCell(s.count), s.verdict || "-",
    s.required === null || s.required === undefined ? "-"
      : `${s.reporting ?? 0} of ${s.required} needed`]);
  const gates = (r.gates || []).map((g) => [g.gate,
    el("td", {class: g.status === "fail" ? "bad" : g.status === "pass" ? "ok" : "muted"},
       g.status), num(g.value, 4), num(g.bound, 4), g.threshold, numCell(g.n)]);
  return el("section", {"data-rollout": r.id},
    el("h2", {}, `${r.id}: ${r.model} v${r.version} `, el("span", {class: tone}, r.state),
       ` \u00b7 step ${r.step}`),
    r.reason ? el("p", {class: "bad"}, r.reason.text || JSON.stringify(r.reason)) : null,
    table(["step", "devices", "verdict", "reporting"], steps, "no steps"),
    el("br"),
    table(["gate", "status", "value", "bound", "threshold", "n"], gates,
          "no gate judged yet"));
}

async function renderAudit() {
  const first = await api("/api/audit?limit=1");
  const since = Math.max(0, first.head.seq - 300);
  const log = await api(`/api/audit?since=${since}&limit=300`);
  const rows = log.entries.slice().reverse().map((e) => [numCell(e.seq),
    new Date(e.at * 1000).toLocaleString(), e.actor, e.action, e.target, e.reason || "",
    e.hash.slice(0, 16)]);
  return el("div", {}, el("h1", {}, "Audit log"),
    el("p", {"data-audit-head": log.head.hash},
       `${log.head.seq} entries, hash-chained; head ${String(log.head.hash).slice(0, 16)}. `,
       "`fleet audit verify` checks every link."),
    table(["seq", "at", "who", "what", "target", "why", "hash"], rows, "no entries yet"));
}

async function renderEvents() {
  const events = await api("/api/events?order=newest&limit=200");
  const rows = events.events.slice().reverse().map((e) => [
    new Date(e.at * 1000).toLocaleString(), e.device || "server", e.kind,
    JSON.stringify(e.detail).slice(0, 200)]);
  return el("div", {}, el("h1", {}, "Events"),
    table(["at", "device", "kind", "detail"], rows, "no events yet"));
}

// --- the shell: login, menu, live refresh ----------------------------------------------

let timer = null;
let rendering = 0;

function showLogin(message) {
  clearTimeout(timer);
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("page").replaceChildren();
  document.getElementById("nav").replaceChildren();
  document.getElementById("login").hidden = false;
  document.getElementById("logout").hidden = true;
  document.getElementById("live").hidden = true;
  document.getElementById("login-error").textContent = message || "";
}

async function refresh() {
  clearTimeout(timer);
  if (!sessionStorage.getItem(TOKEN_KEY)) return showLogin();
  const {page, params} = route();
  const mine = ++rendering;
  const started = performance.now();
  document.getElementById("login").hidden = true;
  document.getElementById("logout").hidden = false;
  document.getElementById("nav").replaceChildren(...PAGES.filter((p) => p.nav).map((p) =>
    el("a", {href: "#/" + p.id, class: p === page ? "current" : ""}, p.title)));
  try {
    const node = await page.render(params);
    if (mine !== rendering) return; // a newer render started meanwhile
    document.getElementById("page").replaceChildren(node);
    document.getElementById("live").hidden = false;
    document.body.dataset.updated = String(Date.now());
  } catch (error) {
    if (error instanceof Unauthorized) return showLogin("The server refused the token.");
    document.getElementById("live").hidden = true;
    document.getElementById("page").replaceChildren(
      el("p", {class: "error"}, "Could not load: " + error.message));
  }
  timer = setTimeout(refresh, Math.max(POLL_MS, 5 * (performance.now() - started)));
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    document.getElementById("token").value = "";
    try {
      await api("/api/status");
    } catch (error) {
      return showLogin(error instanceof Unauthorized ? "The server refused the token."
                                                     : "Could not sign in: " + error.message);
    }
    refresh();
  });
  document.getElementById("logout").addEventListener("click", () => showLogin());
  window.addEventListener("hashchange", refresh);
  refresh();
});
