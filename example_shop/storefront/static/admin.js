// The admin page: sales (tiles and charts), stock, the system drawn with live message rates,
// and the fault-injection switches. Only admins get here; every call is an /api/admin/... one.

import { allProducts, api, pictureOf } from "./api.js";
import { bars, columnsAndLine } from "./charts.js";
import { esc, hhmm, money } from "./format.js";

const LOW_STOCK = 5;
const GRAPH_EVERY_MS = 5_000;
const SALES_EVERY_MS = 10_000;

export async function showAdmin(view, every) {
  document.title = "Admin · msa shop";
  view.innerHTML = `
    <div class="page-head"><h1>Admin</h1><p class="muted">Live: the system every 5 s, sales and stock every 10 s.</p></div>
    <nav class="jump" aria-label="On this page"><a href="#sales-heading">Sales</a><a href="#system-heading">System</a>
      <a href="#faults-heading">Fault injection</a><a href="#stock-heading">Stock</a></nav>
    <section aria-labelledby="sales-heading">
      <h2 id="sales-heading">Sales</h2>
      <div class="tiles" data-testid="summary"></div>
      <div class="charts">
        <figure class="panel" data-testid="best-sellers">
          <figcaption><h3>Best sellers</h3><span class="muted">units sold, all time</span></figcaption>
          <div class="chart-box"></div>
        </figure>
        <figure class="panel" data-testid="sales-timeline">
          <figcaption><h3>Last 60 minutes</h3>
            <span class="legend"><span class="key revenue"></span>revenue per minute
            <span class="key orders"></span>orders per minute</span></figcaption>
          <div class="chart-box"></div>
        </figure>
      </div>
    </section>
    <section aria-labelledby="system-heading">
      <h2 id="system-heading">System</h2>
      <p class="muted">Gateways, services with their databases, and the topics they publish to (solid) and consume from (dashed); numbers are messages per second.</p>
      <div class="system">
        <figure class="panel graph" data-testid="graph"><p class="muted">Drawing…</p></figure>
        <div class="panel rates"><h3>Messages per second, by topic</h3><table data-testid="rates"><tbody><tr><td>Measuring…</td></tr></tbody></table></div>
      </div>
    </section>
    <section aria-labelledby="faults-heading">
      <h2 id="faults-heading">Fault injection</h2>
      <p class="muted">Make a service slow, pause it, decline payments or crash a process, and watch orders and the graph react. Switches are off when the shop starts.</p>
      <div data-testid="faults"><p class="muted">Loading…</p></div>
    </section>
    <section aria-labelledby="stock-heading">
      <h2 id="stock-heading">Stock</h2>
      <p class="muted" data-testid="stock-summary"></p>
      <div class="panel table-box"><table class="stock" data-testid="stock"><tbody><tr><td>Loading…</td></tr></tbody></table></div>
    </section>`;

  // In-page links, not routes: the hash names the page.
  for (const link of view.querySelectorAll(".jump a")) {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      const target = document.getElementById(link.getAttribute("href").slice(1));
      target.scrollIntoView({ behavior: "smooth", block: "start" });
    });
  }
  const names = allProducts().catch(() => new Map());
  await Promise.all([
    showSales(view, names),
    showStock(view, names),
    showGraph(view),
    showFaults(view),
  ]);
  every(GRAPH_EVERY_MS, () => showGraph(view));
  every(SALES_EVERY_MS, () => Promise.all([showSales(view, names), showStock(view, names)]));
}

// -- sales -----------------------------------------------------------------------------------------

async function showSales(view, names) {
  const [summary, best, timeline, products] = await Promise.all([
    api("/admin/analytics/summary").catch(() => null),
    api("/admin/analytics/products?limit=10").catch(() => null),
    api("/admin/analytics/timeline?minutes=60").catch(() => null),
    names,
  ]);
  const tiles = view.querySelector("[data-testid=summary]");
  if (!tiles) return;
  tiles.innerHTML = summary ? `
    <div class="tile"><span class="figure">${summary.orders_placed}</span><span>orders placed</span></div>
    <div class="tile"><span class="figure">${summary.orders_confirmed}</span><span>orders confirmed</span></div>
    <div class="tile"><span class="figure">${money(summary.revenue_cents)}</span><span>revenue</span></div>`
    : `<p class="muted">Sales figures are not available right now.</p>`;

  const sellers = ((best && best.products) || []).filter((p) => p.units > 0);
  view.querySelector("[data-testid=best-sellers] .chart-box").innerHTML = sellers.length
    ? bars(sellers.map((p) => ({
      label: p.name || (products.get(p.product_id) || {}).name || p.product_id,
      value: p.units,
      note: `${p.units} sold · ${money(p.revenue_cents)}`,
    })), { title: "Best sellers by units sold", unit: "units" })
    : `<p class="empty-chart">No sales yet: confirmed orders appear here.</p>`;

  const slots = minuteSlots((timeline && timeline.minutes) || [], 60);
  view.querySelector("[data-testid=sales-timeline] .chart-box").innerHTML = slots.some((s) => s.line > 0 || s.column > 0)
    ? columnsAndLine(slots, {
      title: "Revenue and orders per minute, last 60 minutes",
      columnName: "revenue",
      lineName: "orders",
      columnFormat: (cents) => money(cents),
      lineFormat: (n) => String(n),
      lineWhole: true,
    })
    : `<p class="empty-chart">No orders in the last 60 minutes.</p>`;
}

/** One slot per minute of the last `minutes`, ending with the current one (missing ones: 0). */
function minuteSlots(rows, minutes) {
  const byMinute = new Map(rows.map((r) => [Math.floor(Date.parse(r.minute) / 60_000), r]));
  const now = Math.floor(Date.now() / 60_000);
  const slots = [];
  for (let m = now - minutes + 1; m <= now; m += 1) {
    const row = byMinute.get(m) || {};
    const at = new Date(m * 60_000);
    slots.push({ at, label: hhmm(at), column: row.revenue_cents || 0, line: row.orders || 0 });
  }
  return slots;
}

// -- stock -----------------------------------------------------------------------------------------

async function showStock(view, names) {
  const [stock, products] = await Promise.all([api("/admin/stock"), names]);
  const rows = (Array.isArray(stock) ? stock : stock.items || [])
    .slice()
    .sort((a, b) => a.product_id.localeCompare(b.product_id));
  const table = view.querySelector("[data-testid=stock]");
  if (!table) return;
  const out = rows.filter((s) => s.available <= 0).length;
  const low = rows.filter((s) => s.available > 0 && s.available <= LOW_STOCK).length;
  view.querySelector("[data-testid=stock-summary]").textContent =
    `${rows.length} products · ${out} sold out · ${low} running low (${LOW_STOCK} or fewer available)`;
  table.innerHTML = `
    <thead><tr><th scope="col" class="thumb"><span class="visually-hidden">Picture</span></th><th scope="col">Product</th><th scope="col" class="num on-hand">On hand</th>
      <th scope="col" class="num reserved">Reserved</th><th scope="col" class="num">Available</th><th scope="col">Status</th></tr></thead>
    <tbody>${rows.map((s) => {
      const product = products.get(s.product_id);
      const level = s.available <= 0 ? "out" : s.available <= LOW_STOCK ? "low" : "ok";
      const mark = { out: "Sold out", low: "Low stock", ok: "In stock" }[level];
      return `<tr class="level-${level}" data-testid="stock-row" data-product-id="${esc(s.product_id)}" data-level="${level}">
        <td class="thumb"><img src="${esc(pictureOf(product))}" alt="" width="48" height="36"></td>
        <td><span class="name">${esc(product ? product.name : s.product_id)}</span> <span class="muted id">${esc(s.product_id)}</span></td>
        <td class="num on-hand">${s.on_hand}</td><td class="num reserved">${s.reserved}</td><td class="num">${s.available}</td>
        <td><span class="mark ${level}" data-testid="stock-mark">${mark}</span></td></tr>`;
    }).join("")}</tbody>`;
}

// -- the system ------------------------------------------------------------------------------------

async function showGraph(view) {
  let drawing;
  try {
    drawing = await api("/admin/graph");
  } catch (error) {
    const figure = view.querySelector("[data-testid=graph]");
    if (figure) figure.innerHTML = `<p class="muted">The system drawing is not available: ${esc(error.message)}</p>`;
    return;
  }
  const figure = view.querySelector("[data-testid=graph]");
  if (!figure) return;
  // The storefront's own rendering (framework.graph.render_svg): trusted markup, drawn inline.
  figure.innerHTML = drawing.svg
    ? `<div class="graph-box">${drawing.svg}</div>`
    : `<pre class="mermaid-source">${esc(drawing.mermaid || "")}</pre>`;
  const svg = figure.querySelector("svg");
  if (svg) {
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "The shop's gateways, services, databases and topics");
  }
  const rates = Object.entries(drawing.rates || {}).sort(([a], [b]) => a.localeCompare(b));
  view.querySelector("[data-testid=rates]").innerHTML = rates.length
    ? `<thead><tr><th scope="col">Topic</th><th scope="col" class="num">msg/s</th></tr></thead>
       <tbody>${rates.map(([topic, rate]) => `<tr data-topic="${esc(topic)}"><td>${esc(topic)}</td>
         <td class="num${rate > 0 ? " busy" : ""}">${Number(rate).toFixed(1)}</td></tr>`).join("")}</tbody>`
    : `<tbody><tr><td class="muted">Measuring: rates appear at the next refresh.</td></tr></tbody>`;
}

// -- fault switches --------------------------------------------------------------------------------

const SWITCH_DEFAULTS = { latency_ms: 0, decline_rate: 0, paused: false, crash_next: false };

async function showFaults(view) {
  const box = view.querySelector("[data-testid=faults]");
  let faults;
  try {
    faults = await api("/admin/faults");
  } catch (error) {
    box.innerHTML = `<p class="notice">Fault switches are not available on this shop (${esc(error.message)}).</p>`;
    return;
  }
  const services = Object.entries(faults.services || {}).sort(([a], [b]) => a.localeCompare(b));
  box.innerHTML = `
    ${faults.processes ? "" : `<p class="notice" data-testid="crash-note">The shop runs in one process, so crashing a service would stop all of it: the crash switch is offered only when services run as separate processes (<code>msa shop --processes</code>).</p>`}
    <div class="switches">${services.map(([name, now]) => faultCard(name, now, faults.processes)).join("")}</div>`;
  for (const form of box.querySelectorAll("form[data-service]")) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      applySwitches(form, readSwitches(form, faults.processes));
    });
    form.querySelector("[data-reset]").addEventListener("click", () => {
      const off = { ...SWITCH_DEFAULTS };
      if (form.dataset.service !== "payments") delete off.decline_rate;
      if (!faults.processes) delete off.crash_next;
      applySwitches(form, off);
    });
  }
}

function faultCard(name, now, processes) {
  const id = (field) => `fault-${esc(name)}-${field}`;
  return `<form class="panel switch" data-service="${esc(name)}" data-testid="fault-${esc(name)}" aria-labelledby="${id("name")}">
    <div class="switch-head"><h3 id="${id("name")}">${esc(name)}</h3><span class="state${stateWords(now) === "normal" ? "" : " on"}" data-testid="fault-state">${esc(stateWords(now))}</span></div>
    <label for="${id("latency")}">Added delay (ms)</label>
    <input id="${id("latency")}" name="latency_ms" type="number" min="0" max="10000" step="1" required value="${Number(now.latency_ms) || 0}" inputmode="numeric">
    ${name === "payments" ? `<label for="${id("decline")}">Declined payments (%)</label>
      <input id="${id("decline")}" name="decline_rate" type="number" min="0" max="100" step="1" required value="${Math.round((Number(now.decline_rate) || 0) * 100)}" inputmode="numeric">` : ""}
    <label class="check"><input name="paused" type="checkbox" ${now.paused ? "checked" : ""}> Paused</label>
    ${processes ? `<label class="check"><input name="crash_next" type="checkbox" ${now.crash_next ? "checked" : ""}> Crash at the next request</label>` : ""}
    <p class="problem" role="alert" data-testid="fault-problem"></p>
    <div class="actions"><button class="primary">Apply</button><button type="button" class="secondary" data-reset aria-label="Reset every switch of ${esc(name)}">Reset</button></div>
  </form>`;
}

function readSwitches(form, processes) {
  const switches = {
    latency_ms: Number(form.latency_ms.value) || 0,
    paused: form.paused.checked,
  };
  if (form.decline_rate) switches.decline_rate = (Number(form.decline_rate.value) || 0) / 100;
  if (processes && form.crash_next) switches.crash_next = form.crash_next.checked;
  return switches;
}

async function applySwitches(form, switches) {
  const problem = form.querySelector("[data-testid=fault-problem]");
  const buttons = form.querySelectorAll("button");
  problem.textContent = "";
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const now = await api(`/admin/faults/${encodeURIComponent(form.dataset.service)}`, { method: "PUT", json: switches });
    const state = form.querySelector("[data-testid=fault-state]");
    state.textContent = stateWords(now);
    state.classList.toggle("on", state.textContent !== "normal");
    form.latency_ms.value = Number(now.latency_ms) || 0;
    if (form.decline_rate) form.decline_rate.value = Math.round((Number(now.decline_rate) || 0) * 100);
    form.paused.checked = Boolean(now.paused);
    if (form.crash_next) form.crash_next.checked = Boolean(now.crash_next);
  } catch (error) {
    problem.textContent = error.message;
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

function stateWords(now) {
  const words = [];
  if (Number(now.latency_ms) > 0) words.push(`+${now.latency_ms} ms`);
  if (Number(now.decline_rate) > 0) words.push(`${Math.round(now.decline_rate * 100)} % declined`);
  if (now.paused) words.push("paused");
  if (now.crash_next) words.push("crashes next");
  return words.length ? words.join(" · ") : "normal";
}
