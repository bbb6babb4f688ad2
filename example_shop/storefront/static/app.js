// The storefront: a small single-page app that talks only to the web gateway (/api/...).
// Sign-in sets an HttpOnly `session` cookie (the gateway reads the JWT from it), so the page
// never handles tokens; live order status arrives over Server-Sent Events from Kafka.
"use strict";

const view = document.getElementById("view");
const flash = document.getElementById("flash");
const state = { me: null, cart: { items: [] }, live: null, page: 1, q: "", category: "" };

const money = (cents) => `€${(cents / 100).toFixed(2)}`;
const esc = (text) => String(text ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

async function api(path, options = {}) {
  const init = { credentials: "same-origin", headers: {}, ...options };
  if (options.json !== undefined) {
    init.body = JSON.stringify(options.json);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(`/api${path}`, init);
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const error = new Error((body && (body.detail || body.title)) || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

function say(message) {
  flash.textContent = message || "";
}

// -- session ---------------------------------------------------------------------------------

async function loadMe() {
  try {
    state.me = await api("/auth/me");
  } catch {
    state.me = null;
  }
  const signedIn = Boolean(state.me);
  document.getElementById("signin-link").hidden = signedIn;
  document.getElementById("signout").hidden = !signedIn;
  document.getElementById("admin-link").hidden = !(signedIn && (state.me.roles || []).includes("admin"));
  if (signedIn) await loadCart();
}

async function loadCart() {
  try {
    state.cart = await api("/cart");
  } catch {
    state.cart = { items: [] };
  }
  const count = (state.cart.items || []).reduce((n, item) => n + item.quantity, 0);
  document.getElementById("cart-count").textContent = count;
}

document.getElementById("signout").addEventListener("click", async () => {
  await api("/auth/logout", { method: "POST" }).catch(() => null);
  state.me = null;
  say("Signed out.");
  await loadMe();
  location.hash = "#/";
});

// -- views -----------------------------------------------------------------------------------

async function showProducts() {
  const params = new URLSearchParams({ page: state.page, size: 12 });
  if (state.q) params.set("q", state.q);
  if (state.category) params.set("category", state.category);
  const result = await api(`/products?${params}`);
  view.innerHTML = `
    <h1>Products</h1>
    <div class="grid" data-testid="products">
      ${result.items.map((p) => `
        <div class="card" data-testid="product" data-product-id="${esc(p.product_id)}">
          <div class="image">${esc(p.image || "☕")}</div>
          <strong>${esc(p.name)}</strong>
          <span class="muted">${esc(p.category)}</span>
          <span class="price">${money(p.price_cents)}</span>
          <span class="muted" data-stock="${esc(p.product_id)}">…</span>
          <button class="primary" data-add="${esc(p.product_id)}">Add to cart</button>
        </div>`).join("") || "<p>No products match.</p>"}
    </div>
    <div class="pager">
      <button id="prev" ${state.page <= 1 ? "disabled" : ""}>‹ Prev</button>
      <span data-testid="page">Page ${result.page} of ${Math.max(1, Math.ceil(result.total / result.size))}</span>
      <button id="next" ${result.page * result.size >= result.total ? "disabled" : ""}>Next ›</button>
    </div>`;
  document.getElementById("prev").onclick = () => { state.page -= 1; showProducts(); };
  document.getElementById("next").onclick = () => { state.page += 1; showProducts(); };
  for (const button of view.querySelectorAll("[data-add]")) {
    button.onclick = () => addToCart(button.dataset.add);
  }
  for (const label of view.querySelectorAll("[data-stock]")) {
    api(`/stock/${encodeURIComponent(label.dataset.stock)}`)
      .then((s) => { showStock(label, s.available); })
      .catch((error) => { if (error.status === 404) showStock(label, 0); else label.textContent = ""; });
  }
}

function showStock(label, available) {
  // Shown, not decided here: the orders service refuses a sold-out product (409) itself.
  label.textContent = available > 0 ? `${available} in stock` : "sold out";
  const button = label.parentElement.querySelector("[data-add]");
  if (button && available <= 0) {
    button.disabled = true;
    button.textContent = "Sold out";
  }
}

async function addToCart(productId) {
  if (!state.me) { location.hash = "#/signin"; say("Sign in to shop."); return; }
  // A quantity only: the price is the catalog's, and the cart shows it.
  const current = (state.cart.items || []).find((i) => i.product_id === productId);
  try {
    await api(`/cart/items/${encodeURIComponent(productId)}`, {
      method: "PUT", json: { quantity: (current ? current.quantity : 0) + 1 },
    });
  } catch (error) {
    say(error.message);
    return;
  }
  await loadCart();
  say("Added to cart.");
}

async function showCart() {
  if (!state.me) { location.hash = "#/signin"; return; }
  await loadCart();
  const items = state.cart.items || [];
  const total = items.reduce((sum, i) => sum + i.quantity * i.unit_price_cents, 0);
  view.innerHTML = `
    <h1>Cart</h1>
    <table data-testid="cart">
      <tr><th>Product</th><th>Qty</th><th>Price</th><th></th></tr>
      ${items.map((i) => `<tr><td>${esc(i.product_id)}</td><td>${i.quantity}</td>
        <td>${money(i.quantity * i.unit_price_cents)}</td>
        <td><button data-remove="${esc(i.product_id)}">Remove</button></td></tr>`).join("")}
      <tr><th>Total</th><th></th><th data-testid="cart-total">${money(total)}</th><th></th></tr>
    </table>
    <h2>Checkout</h2>
    <form class="stack" id="checkout" data-testid="checkout">
      <input name="address" required placeholder="Delivery address" value="1 Main Street, Springfield">
      <input name="card_number" required placeholder="Card number" value="4242424242424242">
      <span class="muted">Test cards: 4242 4242 4242 4242 approves, 4000 0000 0000 0002 is declined.</span>
      <button class="primary" ${items.length ? "" : "disabled"}>Place order</button>
    </form>`;
  for (const button of view.querySelectorAll("[data-remove]")) {
    button.onclick = async () => {
      await api(`/cart/items/${encodeURIComponent(button.dataset.remove)}`, { method: "DELETE" });
      showCart();
    };
  }
  document.getElementById("checkout").onsubmit = async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    try {
      const placed = await api("/orders", {
        method: "POST",
        json: { address: form.get("address"), card_number: String(form.get("card_number")).replace(/\s/g, "") },
      });
      await loadCart();
      location.hash = `#/orders/${placed.order_id}`;
    } catch (error) {
      say(`Checkout failed: ${error.message}`);
    }
  };
}

async function showOrders() {
  if (!state.me) { location.hash = "#/signin"; return; }
  const orders = await api("/orders");
  const list = orders.orders || [];
  view.innerHTML = `
    <h1>Your orders</h1>
    <table data-testid="orders">
      <tr><th>Order</th><th>Status</th><th>Total</th><th>Placed</th></tr>
      ${list.map((o) => `<tr><td><a href="#/orders/${esc(o.order_id)}">${esc(o.order_id)}</a></td>
        <td><span class="status ${esc(o.status)}">${esc(o.status)}</span></td>
        <td>${money(o.total_cents)}</td><td>${esc(o.created_at || "")}</td></tr>`).join("")}
    </table>`;
}

// An order's progress, in the order the saga moves through it. The timeline shows what the
// orders service has stored first, then adds what the live stream brings; each step once.
const STEPS = {
  placed: [0, "Order placed"],
  stock_reserved: [1, "Stock reserved"],
  payment_authorized: [2, "Payment authorised"],
  shipment_created: [3, "Shipment created"],
  confirmed: [4, "Order confirmed"],
  cancelled: [4, "Order cancelled"],
  failed: [4, "Needs attention: an undo was not confirmed"],
};
const FINAL = new Set(["confirmed", "cancelled", "failed"]);
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");

async function showOrder(orderId) {
  if (!state.me) { location.hash = "#/signin"; return; }
  const order = await api(`/orders/${encodeURIComponent(orderId)}`);
  view.innerHTML = `
    <h1>Order ${esc(order.order_id)}</h1>
    <p>Status: <span class="status" data-testid="order-status"></span>
       <span class="muted" data-testid="order-reason"></span></p>
    <p>Total ${money(order.total_cents)}</p>
    <h2>Progress</h2>
    <ol class="timeline" data-testid="timeline"></ol>`;
  const timeline = view.querySelector("[data-testid=timeline]");
  showStored(timeline, order);
  follow(orderId, timeline);
}

// The order as stored: its status, and the steps its saga reached.
function showStored(timeline, order) {
  addStep(timeline, "placed", order.created_at);
  for (const step of order.progress || []) addStep(timeline, step, "");
  if (FINAL.has(order.status)) addStep(timeline, order.status, order.updated_at);
  setStatus(order.status, order.reason);
}

function setStatus(status, reason) {
  const label = view.querySelector("[data-testid=order-status]");
  const rank = status in STEPS ? STEPS[status][0] : -1;
  // Never back: a stored copy read a moment before a live event must not undo it.
  if (!label || (label.dataset.rank !== undefined && Number(label.dataset.rank) > rank)) return;
  label.dataset.rank = rank;
  label.textContent = status;
  label.className = `status ${status}`;
  view.querySelector("[data-testid=order-reason]").textContent = reason || "";
}

function addStep(timeline, step, time) {
  if (!(step in STEPS) || timeline.querySelector(`[data-step="${step}"]`)) return;
  const [rank, words] = STEPS[step];
  const item = document.createElement("li");
  item.dataset.step = step;
  item.dataset.rank = rank;
  item.textContent = time ? `${words} · ${when(time)}` : words;
  const later = [...timeline.children].find((li) => Number(li.dataset.rank) > rank);
  timeline.insertBefore(item, later || null);
}

function follow(orderId, timeline) {
  if (state.live) state.live.close();
  const source = new EventSource(`/api/live/orders/${encodeURIComponent(orderId)}`);
  state.live = source;
  const onEvent = (event) => {
    const cloudEvent = JSON.parse(event.data);
    const data = cloudEvent.data || {};
    const step = {
      "shop.orders.placed": "placed",
      "shop.orders.confirmed": "confirmed",
      "shop.orders.cancelled": "cancelled",
      "shop.orders.status_changed": data.status,
    }[cloudEvent.type];
    addStep(timeline, step, cloudEvent.time);
    if (FINAL.has(step)) setStatus(step, data.reason);
    else if (step && step !== "placed") setStatus(step, "");
  };
  // Events from before the stream opened are not replayed: read the stored order again once it
  // is open, so whatever happened in between is shown too (addStep ignores what is there).
  source.onopen = async () => {
    try {
      showStored(timeline, await api(`/orders/${encodeURIComponent(orderId)}`));
    } catch {
      // the stream still brings what happens next
    }
  };
  source.onmessage = onEvent;
  for (const type of ["shop.orders.placed", "shop.orders.confirmed", "shop.orders.cancelled",
    "shop.orders.status_changed", "reset"]) {
    source.addEventListener(type, type === "reset" ? () => showOrder(orderId) : onEvent);
  }
}

function showSignIn() {
  view.innerHTML = `
    <h1>Sign in</h1>
    <form class="stack" id="signin" data-testid="signin-form">
      <input name="email" type="email" required placeholder="Email" value="demo@shop.test">
      <input name="password" type="password" required placeholder="Password" value="demo-password-123">
      <button class="primary">Sign in</button>
    </form>
    <h2>New here?</h2>
    <form class="stack" id="signup" data-testid="signup-form">
      <input name="name" required placeholder="Name">
      <input name="email" type="email" required placeholder="Email">
      <input name="password" type="password" required placeholder="Password (10+ characters)">
      <button class="primary">Create account</button>
    </form>`;
  document.getElementById("signin").onsubmit = async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    try {
      await api("/auth/login", { method: "POST", json: { email: form.get("email"), password: form.get("password") } });
      await loadMe();
      say(`Welcome, ${state.me ? state.me.name || state.me.email : ""}.`);
      location.hash = "#/";
    } catch (error) {
      say(`Sign-in failed: ${error.message}`);
    }
  };
  document.getElementById("signup").onsubmit = async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    try {
      await api("/auth/signup", { method: "POST", json: Object.fromEntries(form) });
      await api("/auth/login", { method: "POST", json: { email: form.get("email"), password: form.get("password") } });
      await loadMe();
      location.hash = "#/";
    } catch (error) {
      say(`Sign-up failed: ${error.message}`);
    }
  };
}

async function showAdmin() {
  if (!state.me || !(state.me.roles || []).includes("admin")) { location.hash = "#/signin"; return; }
  const [stock, summary, trending] = await Promise.all([
    api("/admin/stock").catch(() => ({ items: [] })),
    api("/admin/analytics/summary").catch(() => null),
    api("/admin/analytics/trending?minutes=60&limit=5").catch(() => null),
  ]);
  const rows = stock.items || stock;
  view.innerHTML = `
    <h1>Admin</h1>
    <h2>Analytics</h2>
    <pre data-testid="analytics">${esc(JSON.stringify({ summary, trending }, null, 2))}</pre>
    <h2>Stock</h2>
    <table data-testid="stock">
      <tr><th>Product</th><th>On hand</th><th>Reserved</th></tr>
      ${rows.map((s) => `<tr><td>${esc(s.product_id)}</td><td>${s.on_hand}</td><td>${s.reserved}</td></tr>`).join("")}
    </table>
    <h2>System</h2>
    <pre data-testid="graph" id="graph">loading…</pre>`;
  const refresh = () => api("/admin/graph").then((g) => {
    const target = document.getElementById("graph");
    if (target) target.textContent = g.mermaid || JSON.stringify(g, null, 2);
    return Boolean(target);
  }).catch(() => {
    const target = document.getElementById("graph");
    if (target) target.textContent = "(not available)";
    return false;
  });
  // Live message rates per edge: the graph is redrawn every 5 s while the admin view is open.
  refresh().then(function poll(open) {
    if (open && location.hash === "#/admin") setTimeout(() => refresh().then(poll), 5000);
  });
}

// -- routing ---------------------------------------------------------------------------------

async function route() {
  const hash = location.hash || "#/";
  if (state.live && !hash.startsWith("#/orders/")) { state.live.close(); state.live = null; }
  try {
    if (hash === "#/cart") await showCart();
    else if (hash === "#/orders") await showOrders();
    else if (hash.startsWith("#/orders/")) await showOrder(decodeURIComponent(hash.slice(9)));
    else if (hash === "#/signin") showSignIn();
    else if (hash === "#/admin") await showAdmin();
    else await showProducts();
  } catch (error) {
    view.innerHTML = `<p>Something went wrong: ${esc(error.message)}</p>`;
  }
}

document.getElementById("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  state.q = form.get("q");
  state.category = form.get("category");
  state.page = 1;
  if (location.hash !== "#/" && location.hash !== "") location.hash = "#/";
  else showProducts();
});

window.addEventListener("hashchange", route);

(async () => {
  const categories = await api("/categories").catch(() => []);
  const select = document.querySelector("select[name=category]");
  for (const category of categories.items || categories) {
    const option = document.createElement("option");
    option.value = option.textContent = category.name || category;
    select.appendChild(option);
  }
  await loadMe();
  await route();
})();
