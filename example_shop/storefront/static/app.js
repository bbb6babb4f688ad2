// The storefront: a small single-page app that talks only to the web gateway (/api/...).
// Sign-in sets an HttpOnly `session` cookie (the gateway reads the JWT from it), so the page
// never handles tokens; live order status arrives over Server-Sent Events from the bus.
//
// Pages are hash routes:
//   #/  #/?q=&category=&page=   products          #/products/{id}   a product
//   #/cart                      cart and checkout #/orders          order history
//   #/orders/{id}               an order, live    #/signin          sign in or sign up
//   #/admin                     sales, stock, the system and its fault switches (admins)

import { api } from "./api.js";
import { esc, title } from "./format.js";
import { showOrder, showOrders } from "./orders.js";
import { isAdmin, loadMe, needsSignIn, say, signOut, state, turnPage } from "./session.js";
import { showCart, showProduct, showProducts } from "./shop.js";

const view = document.getElementById("view");

// -- a visit: one page shown; what it started (timers, streams) ends when the next one begins --

let current = null;

function beginVisit() {
  if (current) current.end();
  const stops = [];
  let over = false;
  const visit = {
    get over() { return over; },
    /** Call `stop` when the visitor leaves this page (at once, if they already have). */
    onLeave(stop) {
      if (over) stop();
      else stops.push(stop);
    },
    /** Run `task` every `ms` while this page is shown (the next run waits for the last one). */
    every(ms, task) {
      let timer = null;
      const again = () => {
        timer = setTimeout(async () => {
          try { await task(); } catch { /* shown by the task; try again next time */ }
          if (!over) again();
        }, ms);
      };
      again();
      visit.onLeave(() => clearTimeout(timer));
    },
    end() {
      over = true;
      for (const stop of stops.splice(0)) stop();
    },
  };
  current = visit;
  return visit;
}

// -- routing ---------------------------------------------------------------------------------------

/**
 * Show the page the hash names. Each page is drawn into a new element that replaces the shown
 * one when it is ready, unless the visitor went elsewhere meanwhile (then it is dropped): a
 * slow answer for a page left behind never covers the page that followed it.
 */
async function route({ first = false } = {}) {
  const hash = location.hash || "#/";
  const visit = beginVisit();
  turnPage();
  const [path, query = ""] = hash.slice(1).split("?");
  const params = new URLSearchParams(query);
  const page = document.createElement("div");
  page.className = "page";
  view.setAttribute("aria-busy", "true");
  let match;
  if (path !== "/" && path !== "") {
    const search = document.getElementById("search");
    search.q.value = "";
    search.category.value = "";
  }
  try {
    if (path === "/" || path === "") await showProducts(page, params);
    else if ((match = path.match(/^\/products\/(.+)$/))) await showProduct(page, decodeURIComponent(match[1]));
    else if (path === "/cart") await showCart(page);
    else if (path === "/orders") await showOrders(page);
    else if ((match = path.match(/^\/orders\/(.+)$/))) await showOrder(page, decodeURIComponent(match[1]), visit.onLeave);
    else if (path === "/signin") showSignIn(page);
    else if (path === "/admin") await showAdminPage(page, visit);
    else page.innerHTML = `<div class="empty"><h1>Not found</h1><p>This page does not exist.</p><p><a href="#/">Go to the shop</a></p></div>`;
  } catch (error) {
    page.innerHTML = `<div class="empty"><h1>Something went wrong</h1><p>${esc(error.message)}</p>
      <p><a href="#/">Back to the shop</a></p></div>`;
  }
  if (visit.over || !page.hasChildNodes()) return; // left already, or sent elsewhere (sign in)
  view.removeAttribute("aria-busy");
  view.replaceChildren(page);
  markCurrentLink(path);
  // Move focus to the new page (not at the first load): a screen reader reads its heading.
  if (!first) view.focus({ preventScroll: true });
  window.scrollTo(0, 0);
}

function markCurrentLink(path) {
  for (const link of document.querySelectorAll("header.site nav a")) {
    const target = link.getAttribute("href").slice(1);
    if (target === path || (target === "/orders" && path.startsWith("/orders/"))) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

async function showAdminPage(view, visit) {
  if (needsSignIn("Sign in as an admin to see the admin page.")) return;
  if (!isAdmin()) {
    view.innerHTML = `<div class="empty"><h1>Admins only</h1><p>Your account cannot see this page.</p></div>`;
    return;
  }
  const { showAdmin } = await import("./admin.js");
  await showAdmin(view, visit.every);
}

// -- signing in -------------------------------------------------------------------------------------

function showSignIn(view) {
  document.title = "Sign in · msa shop";
  if (state.me) {
    view.innerHTML = `<div class="empty"><h1>Signed in</h1><p>You are signed in as ${esc(state.me.email)}.</p>
      <p><a class="button primary" href="#/">Go shopping</a></p></div>`;
    return;
  }
  view.innerHTML = `
    <h1>Sign in</h1>
    <div class="columns even">
      <section class="panel" aria-labelledby="signin-heading">
        <h2 id="signin-heading">I have an account</h2>
        <form class="stack" id="signin" data-testid="signin-form">
          <label for="signin-email">Email</label>
          <input id="signin-email" name="email" type="email" required autocomplete="username" value="demo@shop.test">
          <label for="signin-password">Password</label>
          <input id="signin-password" name="password" type="password" required autocomplete="current-password" value="demo-password-123">
          <button class="primary">Sign in</button>
          <p class="hint">Demo customer: demo@shop.test / demo-password-123.</p>
        </form>
      </section>
      <section class="panel" aria-labelledby="signup-heading">
        <h2 id="signup-heading">New here?</h2>
        <form class="stack" id="signup" data-testid="signup-form">
          <label for="signup-name">Name</label>
          <input id="signup-name" name="name" required autocomplete="name">
          <label for="signup-email">Email</label>
          <input id="signup-email" name="email" type="email" required autocomplete="email">
          <label for="signup-password">Password</label>
          <input id="signup-password" name="password" type="password" required minlength="10" autocomplete="new-password" aria-describedby="password-hint">
          <p class="hint" id="password-hint">At least 10 characters.</p>
          <button class="primary">Create account</button>
        </form>
      </section>
    </div>`;
  const signIn = async (email, password) => {
    await api("/auth/login", { method: "POST", json: { email, password } });
    await loadMe();
    say(`Welcome, ${state.me ? state.me.name || state.me.email : ""}.`, { kind: "success", next: true });
    const back = state.afterSignIn;
    state.afterSignIn = "#/";
    location.hash = back && back !== "#/signin" ? back : "#/";
  };
  view.querySelector("#signin").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    try {
      await signIn(form.email.value, form.password.value);
    } catch (error) {
      say(`Sign-in failed: ${error.message}`, { kind: "error" });
    }
  });
  view.querySelector("#signup").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    try {
      await api("/auth/signup", { method: "POST", json: { name: form.name.value, email: form.email.value, password: form.password.value } });
      await signIn(form.email.value, form.password.value);
    } catch (error) {
      say(`Sign-up failed: ${error.message}`, { kind: "error" });
    }
  });
}

// -- the header ---------------------------------------------------------------------------------------

// The skip link's target is an element, not a route.
document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();
  view.focus();
});

document.getElementById("signout").addEventListener("click", async () => {
  await signOut();
  say("You are signed out.", { next: true });
  if (location.hash === "#/" || location.hash === "") route();
  else location.hash = "#/";
});

document.getElementById("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  const params = new URLSearchParams();
  if (form.q.value.trim()) params.set("q", form.q.value.trim());
  if (form.category.value) params.set("category", form.category.value);
  const target = `#/${params.size ? `?${params}` : ""}`;
  if (location.hash === target) route();
  else location.hash = target;
});

async function loadCategories() {
  const categories = await api("/categories").catch(() => ({ items: [] }));
  const select = document.getElementById("search-category");
  state.categories = (categories.items || []).map((category) => category.name);
  for (const name of state.categories) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = title(name);
    select.appendChild(option);
  }
}

window.addEventListener("hashchange", () => route());

(async () => {
  await Promise.all([loadCategories(), loadMe()]);
  await route({ first: true });
})();
