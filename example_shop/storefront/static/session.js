// Who is signed in, their cart, the header that shows both, and the flash message line.

import { api, sessionLost } from "./api.js";

export const state = {
  me: null,
  cart: { items: [], total_cents: 0 },
  /** Where to go once signed in (the page that asked for it). */
  afterSignIn: "#/",
  /** The catalog's categories' names, for the search form and the category links. */
  categories: [],
};

// The session cookie is HttpOnly; identity sets `signed_in=1` beside it, which the page can
// read. Without it nobody is signed in, and /api/auth/me is not asked (it would answer 401).
const HINT = "signed_in";

export const hasSessionHint = () => document.cookie.split(/;\s*/).includes(`${HINT}=1`);

function dropSessionHint() {
  document.cookie = `${HINT}=; Max-Age=0; path=/; SameSite=Lax`;
}

export const isAdmin = () => Boolean(state.me && (state.me.roles || []).includes("admin"));

/** Learn who is signed in (if the hint says someone is), and their cart. */
export async function loadMe() {
  state.me = null;
  if (hasSessionHint()) {
    try {
      state.me = await api("/auth/me");
    } catch {
      dropSessionHint();
    }
  }
  if (state.me) await loadCart();
  else state.cart = { items: [], total_cents: 0 };
  renderHeader();
}

export async function loadCart() {
  try {
    state.cart = await api("/cart");
  } catch {
    state.cart = { items: [], total_cents: 0 };
  }
  renderHeader();
  return state.cart;
}

export async function signOut() {
  await api("/auth/logout", { method: "POST" }).catch(() => null);
  dropSessionHint();
  state.me = null;
  state.cart = { items: [], total_cents: 0 };
  renderHeader();
}

sessionLost.addEventListener("lost", () => {
  dropSessionHint();
  state.me = null;
  renderHeader();
});

export function renderHeader() {
  const signedIn = Boolean(state.me);
  const items = (state.cart.items || []).reduce((n, item) => n + item.quantity, 0);
  document.getElementById("cart-count").textContent = items;
  document.getElementById("signin-link").hidden = signedIn;
  document.getElementById("signout").hidden = !signedIn;
  document.getElementById("admin-link").hidden = !isAdmin();
  const who = document.getElementById("who");
  who.hidden = !signedIn;
  who.textContent = signedIn ? state.me.name || state.me.email : "";
}

// -- the flash line: one message, for the page it was said on (or, with `next`, the next one) ---

const flash = document.getElementById("flash");
let forNextPage = null;

/**
 * Show a message under the header: `say("Added to cart.")`; `say(text, {kind: "error"})`;
 * `say(text, {next: true})` keeps it for the page being navigated to. Navigation clears it.
 */
export function say(message, { kind = "info", next = false } = {}) {
  if (next) {
    forNextPage = { message, kind };
    return;
  }
  flash.textContent = message || "";
  flash.className = `flash ${kind}`;
  flash.hidden = !message;
}

/** Called on every navigation: what was said for this page, or nothing. */
export function turnPage() {
  const pending = forNextPage;
  forNextPage = null;
  say(pending ? pending.message : "", pending || {});
}

/** Send an anonymous visitor to sign in, then back here; false when someone is signed in. */
export function needsSignIn(message = "Please sign in first.") {
  if (state.me) return false;
  state.afterSignIn = location.hash || "#/";
  say(message, { next: true });
  location.hash = "#/signin";
  return true;
}
