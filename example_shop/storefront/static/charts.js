// Charts drawn as inline SVG, from plain numbers: no library. Each returns the SVG's markup.
// Every mark carries a <title> (a tooltip, and what a screen reader says for it).

import { esc } from "./format.js";

const SVG = 'xmlns="http://www.w3.org/2000/svg" role="img" class="chart"';
const INK = "#3b3330";
const GRID = "#e4ddd5";
const BAR = "#9a4f12";
const LINE = "#1f6f8b";

/** Round numbers for an axis from 0 to at least `max`: [0, step, 2 step, ...] (whole steps
 * for `whole` quantities, such as counts). */
function ticks(max, { wanted = 4, whole = false } = {}) {
  if (!(max > 0)) return [0, 1];
  const rough = max / wanted;
  const power = 10 ** Math.floor(Math.log10(rough));
  let step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= rough);
  if (whole) step = Math.max(1, Math.ceil(step));
  const out = [];
  for (let v = 0; v < max + step; v += step) out.push(v);
  return out;
}

const shorten = (text, most) => (text.length > most ? `${text.slice(0, most - 1)}…` : text);

/**
 * Horizontal bars, largest first: `bars([{label, value, note}], {title})`. `note` is written
 * after the bar (e.g. "12 units · €154.80").
 */
export function bars(items, { title, unit = "" }) {
  const width = 560;
  const row = 30;
  const left = 170;
  const right = 120;
  const top = 8;
  const height = top + items.length * row + 8;
  const max = Math.max(...items.map((i) => i.value), 1);
  const scale = (width - left - right) / max;
  const rows = items.map((item, index) => {
    const y = top + index * row;
    const w = Math.max(2, item.value * scale);
    return `<g class="bar" data-value="${item.value}">
      <title>${esc(item.label)}: ${esc(item.note || `${item.value} ${unit}`)}</title>
      <text x="${left - 10}" y="${y + 19}" text-anchor="end" fill="${INK}" font-size="14">${esc(shorten(item.label, 22))}</text>
      <rect x="${left}" y="${y + 5}" width="${w.toFixed(1)}" height="${row - 10}" rx="3" fill="${BAR}"/>
      <text x="${(left + w + 8).toFixed(1)}" y="${y + 19}" fill="${INK}" font-size="13">${esc(item.note || item.value)}</text>
    </g>`;
  });
  return `<svg ${SVG} viewBox="0 0 ${width} ${height}" aria-label="${esc(title)}">${rows.join("")}</svg>`;
}

/**
 * One column per time slot with a line over them, each on its own axis (left: columns,
 * right: line): `columnsAndLine(slots, {...})`, slots `[{label, at, column, line}]`;
 * `lineWhole` for a line of counts (its axis in whole steps).
 */
export function columnsAndLine(slots, { title, columnName, lineName, columnFormat = String, lineFormat = String, lineWhole = false }) {
  const width = 560;
  const height = 230;
  const margin = { left: 62, right: 36, top: 12, bottom: 30 };
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;
  const columnTicks = ticks(Math.max(...slots.map((s) => s.column), 0));
  const lineTicks = ticks(Math.max(...slots.map((s) => s.line), 0), { whole: lineWhole });
  const columnMax = columnTicks[columnTicks.length - 1];
  const lineMax = lineTicks[lineTicks.length - 1];
  const slotW = plotW / Math.max(slots.length, 1);
  const x = (i) => margin.left + i * slotW;
  const yColumn = (v) => margin.top + plotH - (v / columnMax) * plotH;
  const yLine = (v) => margin.top + plotH - (v / lineMax) * plotH;
  const bottom = margin.top + plotH;

  const grid = columnTicks.map((v) => `
    <line x1="${margin.left}" x2="${width - margin.right}" y1="${yColumn(v).toFixed(1)}" y2="${yColumn(v).toFixed(1)}" stroke="${GRID}"/>
    <text x="${margin.left - 6}" y="${(yColumn(v) + 4).toFixed(1)}" text-anchor="end" font-size="12" fill="${INK}">${esc(columnFormat(v))}</text>`);
  const rightAxis = lineTicks.map((v) => `
    <text x="${width - margin.right + 6}" y="${(yLine(v) + 4).toFixed(1)}" font-size="12" fill="${LINE}">${esc(lineFormat(v))}</text>`);
  const every = Math.max(1, Math.ceil(slots.length / 6));
  const labels = slots.map((s, i) => (i % every === 0 || i === slots.length - 1) && s.label ? `
    <text x="${(x(i) + slotW / 2).toFixed(1)}" y="${height - 10}" text-anchor="middle" font-size="12" fill="${INK}">${esc(s.label)}</text>` : "");
  const columns = slots.map((s, i) => s.column > 0 ? `
    <rect class="column" x="${(x(i) + slotW * 0.15).toFixed(1)}" y="${yColumn(s.column).toFixed(1)}" width="${Math.max(1, slotW * 0.7).toFixed(1)}" height="${(bottom - yColumn(s.column)).toFixed(1)}" fill="${BAR}" opacity=".85">
      <title>${esc(s.label)}: ${esc(columnName)} ${esc(columnFormat(s.column))}, ${esc(lineName)} ${esc(lineFormat(s.line))}</title></rect>` : "");
  const points = slots.map((s, i) => [x(i) + slotW / 2, yLine(s.line), s]);
  const path = points.map(([px, py], i) => `${i ? "L" : "M"}${px.toFixed(1)} ${py.toFixed(1)}`).join(" ");
  const dots = points.filter(([, , s]) => s.line > 0).map(([px, py, s]) => `
    <circle class="point" cx="${px.toFixed(1)}" cy="${py.toFixed(1)}" r="3.5" fill="#fff" stroke="${LINE}" stroke-width="2">
      <title>${esc(s.label)}: ${esc(lineName)} ${esc(lineFormat(s.line))}</title></circle>`);
  return `<svg ${SVG} viewBox="0 0 ${width} ${height}" aria-label="${esc(title)}">
    ${grid.join("")}${rightAxis.join("")}
    <line x1="${margin.left}" x2="${width - margin.right}" y1="${bottom}" y2="${bottom}" stroke="${INK}"/>
    ${columns.join("")}
    <path d="${path}" fill="none" stroke="${LINE}" stroke-width="2"/>
    ${dots.join("")}${labels.join("")}
  </svg>`;
}
