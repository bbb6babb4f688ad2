// The web gateway's API, as the page uses it: every call goes to /api/... with the session
// cookie (HttpOnly: the page never sees the token).

/** A refused call: the HTTP status, and the problem's own words (its `detail`). */
export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

/** Told when a call finds the session gone (401): the page forgets who was signed in. */
export const sessionLost = new EventTarget();

/**
 * Call the gateway: `api("/products?q=mug")`, `api("/cart/items/p-001", {method: "PUT",
 * json: {quantity: 2}})`. Resolves to the JSON body (null when empty); rejects with an
 * `ApiError` for a 4xx/5xx answer.
 */
export async function api(path, { method = "GET", json, signal } = {}) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" }, signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(`/api${path}`, init);
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = { detail: text };
  }
  if (!response.ok) {
    if (response.status === 401 && !path.startsWith("/auth/login")) {
      sessionLost.dispatchEvent(new Event("lost"));
    }
    throw new ApiError(response.status, problemText(body, response), body);
  }
  return body;
}

function problemText(body, response) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) {
    // pydantic's list of errors: "address: String should have at least 3 characters"
    return body.detail.map((e) => `${(e.loc || []).slice(1).join(".") || "input"}: ${e.msg}`).join("; ");
  }
  return (body && body.title) || response.statusText || `HTTP ${response.status}`;
}

// -- the catalog, for names and pictures of what carts, orders and stock lists name by id --------

let catalog = null;

/** Product id -> product, for every product (one call, kept while the page is open). */
export async function allProducts() {
  if (!catalog) {
    catalog = api("/products?size=100").then(
      (page) => new Map(page.items.map((p) => [p.product_id, p])),
      (error) => { catalog = null; throw error; },
    );
  }
  return catalog;
}

/** The picture of a product: its own, or the shop's placeholder for one that has none. */
export const pictureOf = (product) =>
  product && typeof product.image === "string" && product.image.startsWith("/static/")
    ? product.image
    : "/static/products/placeholder.svg";
