// The customer's orders: the history, and one order's page with its live timeline.

import { allProducts, api, pictureOf } from "./api.js";
import { clock, dateTime, esc, itemSummary, money, orderNumber } from "./format.js";
import { needsSignIn } from "./session.js";

// -- the history -------------------------------------------------------------------------------

export async function showOrders(view) {
  if (needsSignIn("Sign in to see your orders.")) return;
  document.title = "Your orders · msa shop";
  const { orders = [] } = await api("/orders");
  if (!orders.length) {
    view.innerHTML = `<h1>Your orders</h1>
      <div class="empty" data-testid="orders"><p>You have not ordered anything yet.</p>
      <p><a class="button primary" href="#/">Start shopping</a></p></div>`;
    return;
  }
  view.innerHTML = `
    <h1>Your orders</h1>
    <table class="orders" data-testid="orders">
      <thead><tr><th scope="col">Order</th><th scope="col">Placed</th><th scope="col">Items</th>
        <th scope="col">Status</th><th scope="col" class="num">Total</th></tr></thead>
      <tbody>
      ${orders.map((o) => `<tr data-testid="order-row" data-order-id="${esc(o.order_id)}">
        <th scope="row"><a href="#/orders/${encodeURIComponent(o.order_id)}">Order ${esc(orderNumber(o))}</a></th>
        <td data-label="Placed"><time datetime="${esc(o.created_at)}">${esc(dateTime(o.created_at))}</time></td>
        <td data-label="Items">${esc(itemSummary(o.lines))}</td>
        <td data-label="Status">${badge(o.status)}</td>
        <td data-label="Total" class="num" data-cents="${o.total_cents}">${money(o.total_cents)}</td>
      </tr>`).join("")}
      </tbody>
    </table>`;
}

// -- an order's status, in words -------------------------------------------------------------------

const STATUS_WORDS = {
  pending: "Processing",
  confirmed: "Confirmed",
  cancelled: "Cancelled",
  failed: "Needs attention",
};
const FINAL = new Set(["confirmed", "cancelled", "failed"]);

const badge = (status) =>
  `<span class="status ${esc(status)}" data-status="${esc(status)}">${esc(STATUS_WORDS[status] || status)}</span>`;

// The steps an order can go through, in the order they happen: forward, then (an order that
// cannot be completed) the step that refused and the undoing of what was done, then the outcome.
const STEPS = {
  placed: [0, "Order placed"],
  stock_reserved: [1, "Stock reserved"],
  payment_authorized: [2, "Payment authorised"],
  shipment_created: [3, "Shipment created"],
  stock_rejected: [4, "Not enough stock"],
  payment_declined: [4, "Payment declined"],
  refused: [4, ""], // a step that did not answer in time (no refusal step), see `refusal`
  shipment_cancelled: [5, "Shipment cancelled"],
  payment_refunded: [6, "Payment refunded"],
  stock_released: [7, "Stock released"],
  confirmed: [9, "Order confirmed"],
  cancelled: [9, "Order cancelled"],
  failed: [9, "Needs attention: an undo was not confirmed"],
};

/**
 * The step a cancelled order stopped at, in words, when no participant's refusal was recorded
 * (older orders, timeouts): the saga goes forward one step at a time, so it stopped at the
 * first step it did not reach (the order's reason says why).
 */
function refusal(reached, reason) {
  const silent = /did not answer/.test(reason || "");
  if (!reached.has("stock_reserved")) return silent ? "Inventory did not answer" : "Not enough stock";
  if (!reached.has("payment_authorized")) return silent ? "Payments did not answer" : "Payment declined";
  if (!reached.has("shipment_created")) return silent ? "Shipping did not answer" : "Shipment not created";
  return "Stopped";
}

// -- one order -------------------------------------------------------------------------------------

export async function showOrder(view, orderId, onLeave) {
  if (needsSignIn("Sign in to see your order.")) return;
  const [order, products] = await Promise.all([
    api(`/orders/${encodeURIComponent(orderId)}`),
    allProducts().catch(() => new Map()),
  ]);
  const number = orderNumber(order);
  document.title = `Order ${number} · msa shop`;
  const lines = order.lines || [];
  view.innerHTML = `
    <div class="page-head order-head">
      <h1 data-testid="order-number">Order ${esc(number)}</h1>
      <span class="status" data-testid="order-status"></span>
    </div>
    <p class="muted">Placed <time datetime="${esc(order.created_at)}">${esc(dateTime(order.created_at))}</time>
      <span data-testid="order-reason" class="reason"></span></p>
    <div class="columns">
      <section class="panel wide" aria-labelledby="items-heading">
        <h2 id="items-heading">Items</h2>
        <table class="lines" data-testid="order-items">
          <thead><tr><th scope="col" colspan="2">Product</th><th scope="col" class="num">Price</th>
            <th scope="col" class="num">Quantity</th><th scope="col" class="num">Total</th></tr></thead>
          <tbody>
          ${lines.map((l) => {
            const product = products.get(l.product_id);
            const name = l.name || (product && product.name) || l.product_id;
            return `<tr data-testid="order-line">
              <td class="thumb c-pic"><img src="${esc(pictureOf(product))}" alt="" width="64" height="48"></td>
              <td class="c-name"><a href="#/products/${encodeURIComponent(l.product_id)}">${esc(name)}</a></td>
              <td class="num c-unit" data-cents="${l.unit_price_cents}">${money(l.unit_price_cents)}</td>
              <td class="num c-qty" data-label="Quantity">${l.quantity}</td>
              <td class="num c-total" data-cents="${l.quantity * l.unit_price_cents}">${money(l.quantity * l.unit_price_cents)}</td></tr>`;
          }).join("")}
          </tbody>
          <tfoot><tr><th scope="row" colspan="4">Total</th>
            <td class="num total" data-testid="order-total" data-cents="${order.total_cents}">${money(order.total_cents)}</td></tr></tfoot>
        </table>
        <div class="facts">
          <div><h3>Delivery address</h3><p class="address" data-testid="order-address">${esc(order.address)}</p></div>
          <div><h3>Payment</h3><p data-testid="order-card">Card ending in ${esc(order.card_last4)}</p></div>
        </div>
      </section>
      <section class="panel" aria-labelledby="progress-heading">
        <h2 id="progress-heading">Progress</h2>
        <ol class="timeline" data-testid="timeline" aria-live="polite"></ol>
      </section>
    </div>`;
  const timeline = new Timeline(view);
  timeline.showStored(order);
  if (!FINAL.has(order.status)) follow(orderId, timeline, onLeave);
}

/** The order's timeline and status badge: each step once, in order, with its time. */
class Timeline {
  constructor(view) {
    this.list = view.querySelector("[data-testid=timeline]");
    this.status = view.querySelector("[data-testid=order-status]");
    this.reason = view.querySelector("[data-testid=order-reason]");
    this.setStatus("pending");
  }

  /** What the orders service has stored: every step with its time, and the status. */
  showStored(order) {
    for (const entry of stepsOf(order)) this.add(entry.step, entry.at);
    if (FINAL.has(order.status)) this.finish(order.status, order.reason, order.updated_at);
  }

  add(step, at, detail = "") {
    if (!(step in STEPS)) return;
    const [rank, words] = STEPS[step];
    let item = this.list.querySelector(`[data-step="${step}"]`);
    if (!item) {
      item = document.createElement("li");
      item.dataset.step = step;
      item.dataset.rank = rank;
      item.className = `step ${step}`;
      item.innerHTML = `<span class="words"></span><span class="detail"></span><time></time>`;
      item.querySelector(".words").textContent = words;
      const later = [...this.list.children].find((li) => Number(li.dataset.rank) > rank);
      this.list.insertBefore(item, later || null);
    }
    if (detail) item.querySelector(".detail").textContent = detail;
    const time = item.querySelector("time");
    if (at && !time.dateTime) {
      time.dateTime = at;
      time.textContent = clock(at);
      time.title = dateTime(at);
    }
    return item;
  }

  reached() {
    return new Set([...this.list.children].map((li) => li.dataset.step));
  }

  /** The order's outcome: its step (with the reason and, if cancelled, which step refused). */
  finish(status, reason, at) {
    const reached = this.reached();
    const refusedBy = ["stock_rejected", "payment_declined"].find((step) => reached.has(step));
    if (refusedBy) {
      this.add(refusedBy, null, reason || "");
    } else if (status === "cancelled") {
      const refused = this.add("refused", null, reason || "");
      refused.querySelector(".words").textContent = refusal(reached, reason);
    }
    this.add(status, at, status === "failed" ? reason || "" : "");
    this.setStatus(status, reason);
  }

  setStatus(status, reason = "") {
    // Never back: a stored copy read a moment before a live event must not undo it.
    if (FINAL.has(this.status.dataset.status) && !FINAL.has(status)) return;
    this.status.dataset.status = status;
    this.status.className = `status ${status}`;
    this.status.textContent = STATUS_WORDS[status] || status;
    this.reason.textContent = reason ? `· ${reason}` : "";
  }
}

/** The order's steps as stored: `steps` with their times (older services: `progress`). */
function stepsOf(order) {
  if (Array.isArray(order.steps)) return order.steps.filter((s) => !FINAL.has(s.step));
  return [
    { step: "placed", at: order.created_at },
    ...(order.progress || []).map((step) => (typeof step === "string" ? { step } : step)),
  ];
}

/** Live steps over Server-Sent Events (the gateway streams the order's events from the bus). */
function follow(orderId, timeline, onLeave) {
  const source = new EventSource(`/api/live/orders/${encodeURIComponent(orderId)}`);
  onLeave(() => source.close());
  const onEvent = (event) => {
    const cloudEvent = JSON.parse(event.data);
    const data = cloudEvent.data || {};
    const at = data.at || cloudEvent.time;
    switch (cloudEvent.type) {
      case "shop.orders.placed":
        timeline.add("placed", at);
        break;
      case "shop.orders.status_changed":
        if (data.status === "failed") timeline.finish("failed", data.detail, at);
        else timeline.add(data.status, at, data.detail || "");
        break;
      case "shop.orders.confirmed":
        timeline.finish("confirmed", "", at);
        break;
      case "shop.orders.cancelled":
        timeline.finish("cancelled", data.reason, at);
        break;
      default:
        return;
    }
    if (FINAL.has(timeline.status.dataset.status)) source.close(); // nothing more will come
  };
  // Events from before the stream opened are not replayed: read the stored order again once it
  // is open, so whatever happened in between is shown too (each step is shown once).
  const reread = async () => {
    try {
      timeline.showStored(await api(`/orders/${encodeURIComponent(orderId)}`));
      if (FINAL.has(timeline.status.dataset.status)) source.close();
    } catch {
      // the stream still brings what happens next
    }
  };
  source.onopen = reread;
  for (const type of ["shop.orders.placed", "shop.orders.status_changed", "shop.orders.confirmed",
    "shop.orders.cancelled"]) {
    source.addEventListener(type, onEvent);
  }
  source.addEventListener("reset", reread);
  source.addEventListener("close", () => source.close());
}
