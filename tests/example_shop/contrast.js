// Text below WCAG 2.x AA contrast in the page: 4.5:1, or 3:1 for large text (24 px, or 18.66 px
// bold). Each element that shows text of its own (or a form field) is judged against the colour
// behind it, the backgrounds of its ancestors blended; an element over a picture or gradient is
// not judged. Returns one line per failure. Run by tests/example_shop/browsing.py.
() => {
  const parse = (c) => { const m = c.match(/rgba?\(([^)]+)\)/); if (!m) return null;
    const [r, g, b, a = 1] = m[1].split(/[ ,/]+/).filter(Boolean).map(Number); return { r, g, b, a }; };
  const lum = ({ r, g, b }) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const over = (top, bottom) => ({ r: top.r * top.a + bottom.r * (1 - top.a), g: top.g * top.a + bottom.g * (1 - top.a),
    b: top.b * top.a + bottom.b * (1 - top.a), a: 1 });
  const background = (el) => {
    const layers = [];
    for (let node = el; node; node = node.parentElement) {
      const style = getComputedStyle(node);
      if (style.backgroundImage !== "none") return null;  // a picture or gradient: not judged here
      const c = parse(style.backgroundColor);
      if (c && c.a > 0) { layers.push(c); if (c.a >= 1) break; }
    }
    return layers.reverse().reduce((acc, c) => over(c, acc), { r: 255, g: 255, b: 255, a: 1 });
  };
  const failures = [];
  for (const el of document.querySelectorAll("body *")) {
    if (el.closest("svg")) continue;
    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    const field = ["INPUT", "SELECT", "TEXTAREA"].includes(el.tagName) && el.type !== "checkbox";
    if (!own && !field) continue;
    const box = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    if (box.width <= 1 || box.height <= 1 || style.visibility === "hidden" || Number(style.opacity) === 0) continue;
    const bg = background(el);
    const fg = parse(style.color);
    if (!bg || !fg) continue;
    const text = over(fg, bg);
    const [hi, lo] = [lum(text), lum(bg)].sort((a, b) => b - a);
    const ratio = (hi + 0.05) / (lo + 0.05);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
    if (ratio < (large ? 3 : 4.5)) {
      failures.push(`${el.tagName.toLowerCase()}${el.className ? "." + String(el.className).replace(/ +/g, ".") : ""} ` +
        `"${(el.textContent || el.value || "").trim().slice(0, 40)}" ${ratio.toFixed(2)}:1 (${style.color} on rgb(${bg.r},${bg.g},${bg.b}))`);
    }
  }
  return failures;
}
