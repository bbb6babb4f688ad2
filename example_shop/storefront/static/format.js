// How the shop writes things for people: money, dates, order numbers, HTML-safe text.

const euros = new Intl.NumberFormat(undefined, { style: "currency", currency: "EUR" });
const dateAndTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
const timeOfDay = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const hourMinute = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });

/** Text made safe to put inside HTML (element content or a quoted attribute). */
export const esc = (text) => String(text ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

/** `1290` -> `€12.90`. */
export const money = (cents) => euros.format((Number(cents) || 0) / 100);

/** An ISO time as a date and time ("2 Dec 2025, 14:03"); "" for none. */
export const dateTime = (iso) => (iso ? dateAndTime.format(new Date(iso)) : "");

/** An ISO time as the time of day with seconds ("14:03:27"), for a timeline; "" for none. */
export const clock = (iso) => (iso ? timeOfDay.format(new Date(iso)) : "");

/** A Date as hours and minutes, for chart axes. */
export const hhmm = (date) => hourMinute.format(date);

/** The number people use for an order: "#1001" (the start of its id, if it has none). */
export const orderNumber = (order) =>
  order.number ? `#${order.number}` : `#${String(order.order_id).slice(0, 8).toUpperCase()}`;

/** "1 item", "3 items". */
export const count = (n, one, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;

/** What an order holds, in a few words: "2 × Classic White Mug, Sencha Green Tea". */
export function itemSummary(lines, limit = 2) {
  const named = (lines || []).map((l) => (l.quantity > 1 ? `${l.quantity} × ${l.name || l.product_id}` : l.name || l.product_id));
  const more = named.length - limit;
  return named.slice(0, limit).join(", ") + (more > 0 ? ` and ${count(more, "more item")}` : "");
}

/** A category's name for people: "mugs" -> "Mugs". */
export const title = (word) => String(word ?? "").replace(/^./, (c) => c.toUpperCase());
