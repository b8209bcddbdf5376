// The admin page: usage per day (an inline SVG chart), the top users, and the API keys (create,
// revoke), all from the admin API (/v1/admin/*) with the admin key, which stays in this tab's
// sessionStorage only. No inline script or style: the page's CSP allows neither.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "vlbot-admin-key";
const SVG = "http://www.w3.org/2000/svg";
let adminKey = sessionStorage.getItem(STORE) || "";

async function api(path, options = {}) {
  const headers = { Authorization: "Bearer " + adminKey };
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    const error = new Error((body.error && body.error.message) || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return response;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function number(value, digits = 0) {
  return Number(value || 0).toLocaleString("en-US", { maximumFractionDigits: digits });
}

function day(unix) {
  return new Date(unix * 1000).toISOString().slice(0, 10);
}

// every UTC day of the period, with zeros where the ledger has no use
function fillDays(report) {
  const found = new Map(report.per_day.map((d) => [d.day, d]));
  const days = [];
  const count = Math.max(1, Math.round(report.days));
  for (let t = report.until - (count - 1) * 86400; t <= report.until + 1; t += 86400) {
    const key = day(t);
    days.push(found.get(key) || { day: key, requests: 0, images: 0, engine_s: 0 });
  }
  return days;
}

function niceMax(value) {
  if (value <= 0) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
  return 10 * step;
}

function drawChart(days) {
  const chart = $("chart");
  chart.replaceChildren();
  const W = 760, H = 260, left = 44, right = 52, top = 14, bottom = 30;
  const plotW = W - left - right, plotH = H - top - bottom;
  const maxRequests = niceMax(Math.max(...days.map((d) => d.requests)));
  const maxEngine = niceMax(Math.max(...days.map((d) => d.engine_s)));
  for (const f of [0, 0.5, 1]) {
    const y = top + plotH * (1 - f);
    chart.append(svg("line", { class: "grid", x1: left, x2: W - right, y1: y, y2: y }));
    chart.append(svg("text", { class: "requests-axis", x: left - 6, y: y + 4, "text-anchor": "end" },
      number(maxRequests * f, 1)));
    chart.append(svg("text", { class: "engine-axis", x: W - right + 6, y: y + 4 },
      number(maxEngine * f, 1) + " s"));
  }
  const slot = plotW / days.length;
  const points = [];
  const labelEvery = Math.ceil(days.length / 10);
  days.forEach((d, i) => {
    const height = (d.requests / maxRequests) * plotH;
    const bar = svg("rect", {
      class: "bar", x: left + i * slot + slot * 0.15, y: top + plotH - height,
      width: slot * 0.7, height,
    });
    bar.append(svg("title", {}, `${d.day}: ${d.requests} requests, ${number(d.engine_s, 1)} engine s`));
    chart.append(bar);
    const x = left + i * slot + slot / 2;
    points.push([x, top + plotH * (1 - d.engine_s / maxEngine)]);
    if (i % labelEvery === 0 || i === days.length - 1) {
      chart.append(svg("text", { x, y: H - 10, "text-anchor": "middle" }, d.day.slice(5)));
    }
  });
  chart.append(svg("polyline", { class: "line", points: points.map((p) => p.join(",")).join(" ") }));
  for (const [x, y] of points) chart.append(svg("circle", { class: "dot", cx: x, cy: y, r: 3 }));
}

function drawTotals(report) {
  const t = report.totals;
  const rows = [
    ["Requests", number(t.requests)],
    ["Images", number(t.images)],
    ["Engine seconds", number(t.engine_s, 1)],
    ["Refused", number(t.rejected)],
    ["First token p50", report.first_token_p50_s == null ? "–" : number(report.first_token_p50_s, 2) + " s"],
    ["First token p95", report.first_token_p95_s == null ? "–" : number(report.first_token_p95_s, 2) + " s"],
  ];
  $("totals").replaceChildren(...rows.map(([name, value]) => {
    const box = el("div");
    box.append(el("dt", name), el("dd", value));
    return box;
  }));
}

function drawUsers(report) {
  const body = $("users").tBodies[0];
  body.replaceChildren(...report.top_users.map((u) => {
    const row = el("tr");
    row.append(el("td", u.subject), el("td", u.name), el("td", number(u.requests), "num"),
      el("td", number(u.images), "num"), el("td", number(u.engine_s, 1), "num"));
    return row;
  }));
  $("no-users").hidden = report.top_users.length > 0;
}

function quotaText(quota) {
  const names = { requests_per_day: "requests", images_per_day: "images",
                  engine_seconds_per_day: "engine s", max_waiting: "waiting" };
  const set = Object.entries(quota).filter(([, v]) => v !== null).map(([k, v]) => `${names[k]} ${v}`);
  return set.join(", ") || "defaults";
}

function drawKeys(keys) {
  const body = $("keys").tBodies[0];
  body.replaceChildren(...keys.map((k) => {
    const row = el("tr", null, k.active ? "" : "revoked");
    row.dataset.key = k.id;
    const action = el("td");
    if (k.active) {
      const button = el("button", "Revoke", "revoke");
      button.type = "button";
      button.addEventListener("click", () => revoke(k.id, k.name));
      action.append(button);
    }
    row.append(el("td", k.id), el("td", k.name), el("td", day(k.created_at)), el("td", quotaText(k.quota)),
      el("td", k.active ? "active" : "revoked " + day(k.revoked_at)), action);
    return row;
  }));
}

async function refresh() {
  const days = $("days").value;
  const [usage, keys] = await Promise.all([
    api(`/v1/admin/usage?since=${days}d`).then((r) => r.json()),
    api("/v1/admin/keys").then((r) => r.json()),
  ]);
  drawTotals(usage);
  drawChart(fillDays(usage));
  drawUsers(usage);
  drawKeys(keys.data);
}

async function load() {
  try {
    await refresh();
    showError("");
    $("board").hidden = false;
    $("signin").hidden = true;
    $("signout").hidden = false;
  } catch (error) {
    $("board").hidden = true;
    $("signin").hidden = false;
    $("signout").hidden = true;
    if (error.status === 401 || error.status === 403) sessionStorage.removeItem(STORE);
    showError(error.message);
  }
}

async function revoke(id, name) {
  if (!confirm(`Revoke the key "${name}" (${id})? Its holder is refused from the next request.`)) return;
  try {
    await api(`/v1/admin/keys/${encodeURIComponent(id)}`, { method: "DELETE" });
    await refresh();
  } catch (error) {
    showError(error.message);
  }
}

function limitValue(id, parse) {
  const raw = $(id).value.trim();
  return raw === "" ? null : parse(raw);
}

$("signin").addEventListener("submit", (event) => {
  event.preventDefault();
  adminKey = $("admin-key").value.trim();
  sessionStorage.setItem(STORE, adminKey);
  $("admin-key").value = "";
  load();
});

$("signout").addEventListener("click", () => {
  sessionStorage.removeItem(STORE);
  adminKey = "";
  $("board").hidden = true;
  $("signin").hidden = false;
  $("signout").hidden = true;
});

$("days").addEventListener("change", () => load());

$("new-key").addEventListener("submit", async (event) => {
  event.preventDefault();
  const quota = {
    requests_per_day: limitValue("key-requests", (v) => parseInt(v, 10)),
    images_per_day: limitValue("key-images", (v) => parseInt(v, 10)),
    engine_seconds_per_day: limitValue("key-engine", Number),
    max_waiting: limitValue("key-waiting", (v) => parseInt(v, 10)),
  };
  try {
    const response = await api("/v1/admin/keys", {
      method: "POST", body: JSON.stringify({ name: $("key-name").value.trim(), quota }),
    });
    const created = await response.json();
    $("secret-value").textContent = created.secret;
    $("secret").hidden = false;
    $("new-key").reset();
    showError("");
    await refresh();
  } catch (error) {
    showError(error.message);
  }
});

$("csv").addEventListener("click", async (event) => {
  event.preventDefault();
  try {
    const days = $("days").value;
    const blob = await (await api(`/v1/admin/usage?since=${days}d&format=csv`)).blob();
    const link = el("a");
    link.href = URL.createObjectURL(blob);
    link.download = `vlbot-usage-${days}d.csv`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  } catch (error) {
    showError(error.message);
  }
});

if (adminKey) load();
