// Shopping: the product grid (with search), a product's page, the cart and its checkout.

import { ApiError, allProducts, api, pictureOf } from "./api.js";
import { count, esc, money, orderNumber, title } from "./format.js";
import { loadCart, needsSignIn, say, state } from "./session.js";

const PAGE_SIZE = 12;
const LOW_STOCK = 5;

// -- the grid ----------------------------------------------------------------------------------

export async function showProducts(view, params) {
  const q = params.get("q") || "";
  const category = params.get("category") || "";
  const page = Math.max(1, Number(params.get("page")) || 1);
  const search = document.getElementById("search");
  search.q.value = q;
  search.category.value = category;

  const query = new URLSearchParams({ page, size: PAGE_SIZE });
  if (q) query.set("q", q);
  if (category) query.set("category", category);
  const result = await api(`/products?${query}`);
  const pages = Math.max(1, Math.ceil(result.total / result.size));
  const heading = q
    ? `Results for “${esc(q)}”${category ? ` in ${esc(title(category))}` : ""}`
    : category ? esc(title(category)) : "All products";
  document.title = `${q ? `“${q}”` : category ? title(category) : "Shop"} · msa shop`;
  const link = (p) => {
    const next = new URLSearchParams(params);
    next.set("page", p);
    return `#/?${next}`;
  };
  const categoryLink = (name, words) =>
    `<a href="#/${name ? `?category=${encodeURIComponent(name)}` : ""}"${name === category && !q ? ' aria-current="page"' : ""}>${esc(words)}</a>`;
  view.innerHTML = `
    ${!q && !category && page === 1 ? `<section class="welcome" aria-label="Welcome">
      <p class="tagline">Coffee, tea and the things to brew them</p>
      <p>Freshly roasted beans, loose-leaf teas, mugs and brewing gear. Free delivery on every order.</p>
    </section>` : ""}
    <nav class="categories" aria-label="Categories">${categoryLink("", "All")}${state.categories.map((name) => categoryLink(name, title(name))).join("")}</nav>
    <div class="page-head">
      <h1>${heading}</h1>
      <p class="muted">${count(result.total, "product")}${q || category ? ` · <a href="#/">Show all products</a>` : ""}</p>
    </div>
    ${result.items.length ? `<ul class="grid" data-testid="products">
      ${result.items.map(productCard).join("")}
    </ul>` : `<div class="empty" data-testid="products"><p>No products match your search.</p>
      <p><a href="#/">Browse all products</a></p></div>`}
    ${pages > 1 ? `<nav class="pager" aria-label="Pages">
      ${page > 1 ? `<a class="button secondary" href="${link(page - 1)}" rel="prev">‹ Previous</a>` : ""}
      <span data-testid="page">Page ${result.page} of ${pages}</span>
      ${page < pages ? `<a class="button secondary" href="${link(page + 1)}" rel="next">Next ›</a>` : ""}
    </nav>` : ""}`;
  for (const button of view.querySelectorAll("[data-add]")) {
    button.addEventListener("click", () => addToCart(button.dataset.add, 1, button.dataset.name));
  }
  // One request for the page's stock (public); a product inventory keeps no stock for has none.
  const cards = [...view.querySelectorAll("[data-product-id]")];
  if (!cards.length) return;
  const ids = cards.map((card) => card.dataset.productId).join(",");
  api(`/availability?ids=${encodeURIComponent(ids)}`)
    .then((stock) => {
      const available = new Map(stock.items.map((item) => [item.product_id, item.available]));
      for (const card of cards) showStock(card, available.get(card.dataset.productId) ?? 0);
    })
    .catch(() => { for (const card of cards) showStock(card, null); });
}

function productCard(p) {
  const href = `#/products/${encodeURIComponent(p.product_id)}`;
  return `
    <li class="card" data-testid="product" data-product-id="${esc(p.product_id)}">
      <a class="picture" href="${href}" tabindex="-1" aria-hidden="true">
        <img src="${esc(pictureOf(p))}" alt="${esc(p.name)}" width="400" height="300">
      </a>
      <div class="card-body">
        <span class="category">${esc(title(p.category))}</span>
        <h2 class="name"><a href="${href}">${esc(p.name)}</a></h2>
        <div class="buy">
          <span class="price" data-cents="${p.price_cents}">${money(p.price_cents)}</span>
          <span class="stock" data-stock aria-live="polite">Checking stock…</span>
        </div>
        <button type="button" class="primary" data-add="${esc(p.product_id)}" data-name="${esc(p.name)}" disabled>Add to cart</button>
      </div>
    </li>`;
}

/** The card's stock line and button: sold out, a few left, in stock, or not known now. */
function showStock(card, available) {
  const label = card.querySelector("[data-stock]");
  const button = card.querySelector("[data-add]");
  if (!label || !button) return;
  const known = typeof available === "number";
  label.dataset.available = known ? available : "";
  label.textContent = stockWords(available);
  label.className = `stock ${stockClass(available)}`;
  card.classList.toggle("sold-out", known && available <= 0);
  // Shown, not decided here: the orders service refuses a sold-out product (409) itself.
  button.disabled = known && available <= 0;
  button.textContent = known && available <= 0 ? "Sold out" : "Add to cart";
}

const stockWords = (available) =>
  typeof available !== "number" ? "Stock not known right now"
    : available <= 0 ? "Sold out"
    : available <= LOW_STOCK ? `Only ${available} left`
    : `${available} in stock`;

const stockClass = (available) =>
  typeof available !== "number" ? "unknown" : available <= 0 ? "out" : available <= LOW_STOCK ? "low" : "in";

async function addToCart(productId, quantity, name) {
  if (needsSignIn("Sign in to add products to your cart.")) return;
  const current = (state.cart.items || []).find((i) => i.product_id === productId);
  // A quantity only: the price is the catalog's, and the cart shows it.
  try {
    await api(`/cart/items/${encodeURIComponent(productId)}`, {
      method: "PUT", json: { quantity: (current ? current.quantity : 0) + quantity },
    });
  } catch (error) {
    say(`Could not add ${name || productId}: ${error.message}`, { kind: "error" });
    return;
  }
  await loadCart();
  say(`Added ${quantity > 1 ? `${quantity} × ` : ""}${name || productId} to your cart.`, { kind: "success" });
}

// -- a product's page --------------------------------------------------------------------------

export async function showProduct(view, productId) {
  let page;
  try {
    page = await api(`/product-page/${encodeURIComponent(productId)}`);
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 404) throw error;
    view.innerHTML = `<div class="empty"><h1>Not found</h1><p>There is no such product.</p>
      <p><a href="#/">Browse all products</a></p></div>`;
    return;
  }
  const p = page.product;
  const available = page.stock ? page.stock.available : null;
  const most = typeof available === "number" ? Math.min(available, 10) : 10;
  document.title = `${p.name} · msa shop`;
  view.innerHTML = `
    <nav class="crumbs" aria-label="Breadcrumb"><a href="#/">Shop</a> ›
      <a href="#/?category=${encodeURIComponent(p.category)}">${esc(title(p.category))}</a></nav>
    <article class="product" data-testid="product-page" data-product-id="${esc(p.product_id)}">
      <div class="picture"><img src="${esc(pictureOf(p))}" alt="${esc(p.name)}" width="400" height="300"></div>
      <div class="details">
        <h1>${esc(p.name)}</h1>
        <p class="price big" data-cents="${p.price_cents}">${money(p.price_cents)}</p>
        <p class="description">${esc(p.description)}</p>
        <p class="stock ${stockClass(available)}" data-testid="product-stock">${stockWords(available)}</p>
        <form class="add" id="add">
          <label for="quantity">Quantity</label>
          <input id="quantity" name="quantity" type="number" min="1" max="${Math.max(1, most)}" value="1" inputmode="numeric" ${most <= 0 ? "disabled" : ""}>
          <button class="primary" ${most <= 0 ? "disabled" : ""}>${most <= 0 ? "Sold out" : "Add to cart"}</button>
        </form>
        <p class="muted">Free delivery · pay by card at checkout</p>
      </div>
    </article>`;
  view.querySelector("#add").addEventListener("submit", (event) => {
    event.preventDefault();
    const quantity = Math.max(1, Number(event.target.quantity.value) || 1);
    addToCart(p.product_id, quantity, p.name);
  });
}

// -- the cart and checkout ---------------------------------------------------------------------

export async function showCart(view) {
  if (needsSignIn("Sign in to see your cart.")) return;
  document.title = "Cart · msa shop";
  const [cart, products] = await Promise.all([loadCart(), allProducts().catch(() => new Map())]);
  const items = cart.items || [];
  const total = items.reduce((sum, i) => sum + i.quantity * i.unit_price_cents, 0);
  if (!items.length) {
    view.innerHTML = `
      <h1>Your cart</h1>
      <div class="empty" data-testid="cart"><p>Your cart is empty.</p>
        <p><a class="button primary" href="#/">Browse products</a></p></div>`;
    return;
  }
  view.innerHTML = `
    <h1>Your cart</h1>
    <div class="columns">
      <section class="panel wide" aria-labelledby="cart-heading">
        <h2 id="cart-heading" class="visually-hidden">Items</h2>
        <table class="lines" data-testid="cart">
          <thead><tr><th scope="col" colspan="2">Product</th><th scope="col" class="num">Price</th>
            <th scope="col" class="num">Quantity</th><th scope="col" class="num">Total</th><th scope="col"><span class="visually-hidden">Remove</span></th></tr></thead>
          <tbody>
          ${items.map((i) => cartLine(i, products.get(i.product_id))).join("")}
          </tbody>
          <tfoot><tr><th scope="row" colspan="4">Total</th>
            <td class="num total" data-testid="cart-total" data-cents="${total}">${money(total)}</td><td></td></tr></tfoot>
        </table>
        <p class="after-table"><a href="#/">‹ Continue shopping</a></p>
      </section>
      <section class="panel" aria-labelledby="checkout-heading">
        <h2 id="checkout-heading">Checkout</h2>
        <form class="stack" id="checkout" data-testid="checkout">
          <label for="address">Delivery address</label>
          <textarea id="address" name="address" required minlength="3" rows="3" autocomplete="street-address">1 Main Street, Springfield</textarea>
          <label for="card">Card number</label>
          <input id="card" name="card_number" required inputmode="numeric" autocomplete="cc-number" value="4242 4242 4242 4242">
          <p class="hint">Test cards: 4242 4242 4242 4242 is approved, 4000 0000 0000 0002 is declined.</p>
          <p class="sum">To pay <strong data-cents="${total}">${money(total)}</strong></p>
          <button class="primary">Place order</button>
        </form>
      </section>
    </div>`;
  for (const input of view.querySelectorAll("[data-quantity]")) {
    input.addEventListener("change", async () => {
      const quantity = Number(input.value);
      if (!Number.isInteger(quantity) || quantity < 1) { input.value = input.defaultValue; return; }
      try {
        await api(`/cart/items/${encodeURIComponent(input.dataset.quantity)}`, { method: "PUT", json: { quantity } });
      } catch (error) {
        say(`Could not change the quantity: ${error.message}`, { kind: "error" });
      }
      await showCart(view);
    });
  }
  for (const button of view.querySelectorAll("[data-remove]")) {
    button.addEventListener("click", async () => {
      await api(`/cart/items/${encodeURIComponent(button.dataset.remove)}`, { method: "DELETE" }).catch(() => null);
      say(`Removed ${button.dataset.name} from your cart.`);
      await showCart(view);
    });
  }
  view.querySelector("#checkout").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const button = form.querySelector("button");
    button.disabled = true;
    button.textContent = "Placing your order…";
    try {
      const placed = await api("/orders", {
        method: "POST",
        json: { address: form.address.value, card_number: form.card_number.value.replace(/[\s-]/g, "") },
      });
      await loadCart();
      say(`Thank you! Your order ${orderNumber(placed)} is placed.`, { kind: "success", next: true });
      location.hash = `#/orders/${encodeURIComponent(placed.order_id)}`;
    } catch (error) {
      say(`Checkout failed: ${error.message}`, { kind: "error" });
      button.disabled = false;
      button.textContent = "Place order";
    }
  });
}

function cartLine(item, product) {
  const name = item.name || (product && product.name) || item.product_id;
  const href = `#/products/${encodeURIComponent(item.product_id)}`;
  return `<tr data-testid="cart-line" data-product-id="${esc(item.product_id)}">
    <td class="thumb c-pic"><img src="${esc(pictureOf(product))}" alt="" width="64" height="48"></td>
    <td class="c-name"><a href="${href}" data-testid="line-name">${esc(name)}</a></td>
    <td class="num c-unit" data-testid="unit-price" data-cents="${item.unit_price_cents}">${money(item.unit_price_cents)}</td>
    <td class="num c-qty"><label class="visually-hidden" for="qty-${esc(item.product_id)}">Quantity of ${esc(name)}</label>
      <input class="qty" id="qty-${esc(item.product_id)}" type="number" min="1" max="100" value="${item.quantity}" data-quantity="${esc(item.product_id)}" inputmode="numeric"></td>
    <td class="num c-total" data-testid="line-total" data-cents="${item.quantity * item.unit_price_cents}">${money(item.quantity * item.unit_price_cents)}</td>
    <td class="num c-remove"><button type="button" class="link-button danger" data-remove="${esc(item.product_id)}" data-name="${esc(name)}" aria-label="Remove ${esc(name)}">Remove</button></td>
  </tr>`;
}
