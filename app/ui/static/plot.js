// optiforge web console: the scatter plots (speedup against accuracy, speedup against accuracy drop),
// drawn as inline SVG at the pixel width of their box, so that text keeps its CSS size (11-12 px)
// on a phone as on a desktop. Markers never hide each other: one that would cover another is moved
// aside on a ring around its true place, with a leader line back to a dot at that place. Each marker
// carries a short key (a number; "O" for the original) and the legend table under the plot spells
// out what it is, so no free-floating label can overlap another either.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const MARKER_R = 10;          // px: a marker's radius (half the original's square side)
const MARKER_GAP = 3;         // px: the least space between two markers
const MIN_PLOT_WIDTH = 280;   // px
const MAX_PLOT_WIDTH = 760;   // px

function svgNode(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

// Round tick values over [low, high]: steps of 1, 2 or 5 × a power of ten, about `count` of them.
function niceTicks(low, high, count = 5) {
  const span = high - low || Math.abs(high) || 1;
  const raw = span / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => span / s <= count) || 10 * power;
  const ticks = [];
  for (let v = Math.ceil(low / step) * step; v <= high + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return { ticks, step };
}

// Where each marker goes: its true place unless that would cover a marker already placed, else
// the first free place on rings around it (inside the plot area). Returns [{px, py, mx, my}].
function placeMarkers(places, box) {
  const placed = [];
  const minDistance = 2 * MARKER_R + MARKER_GAP;
  const free = (x, y) => x >= box.left + MARKER_R && x <= box.right - MARKER_R
    && y >= box.top + MARKER_R && y <= box.bottom - MARKER_R
    // apart along x or along y: their bounding squares (a square marker's corners included) never meet
    && placed.every((p) => Math.max(Math.abs(p.mx - x), Math.abs(p.my - y)) >= minDistance);
  for (const { px, py } of places) {
    let spot = free(px, py) ? { mx: px, my: py } : null;
    for (let ring = 1; !spot && ring <= 12; ring++) {
      const radius = ring * (minDistance + 4);
      const steps = 8 * ring;
      for (let k = 0; k < steps && !spot; k++) {
        const angle = -Math.PI / 4 - (2 * Math.PI * k) / steps; // up-right first, then around
        const x = px + radius * Math.cos(angle), y = py + radius * Math.sin(angle);
        if (free(x, y)) spot = { mx: x, my: y };
      }
    }
    spot = spot || { mx: px, my: py }; // a plot too crowded to separate: at its place (not seen so far)
    placed.push({ px, py, ...spot });
  }
  return placed;
}

// A marker's shape by kind: the original a square, every engine a circle (the chosen one ringed,
// front members red, out of the budget grey), with its key inside.
function markerShape(kind, x, y) {
  if (kind === "original") {
    return svgNode("rect", { x: x - MARKER_R, y: y - MARKER_R, width: 2 * MARKER_R, height: 2 * MARKER_R, class: "marker original" });
  }
  return svgNode("circle", { cx: x, cy: y, r: MARKER_R, class: `marker ${kind}` });
}

/**
 * A scatter plot with a legend table.
 * points: [{x, y, kind: "original"|"chosen"|"front"|"accepted"|"rejected", key, title, cells: [...]}]
 * options: {width, xLabel, yLabel, xFormat(value, decimals), yFormat(value, decimals), ariaLabel,
 *   columns: [legend headings after "#"] (legend: false for none), xInclude: [values the x axis must show], yInclude, vline: {x, label}, hline: {y, label},
 *   frontLine: true to join the "front" and "chosen" points in x order}
 * Returns a <div class="plot"> holding the <svg> and the legend <table>.
 */
function scatterPlot(points, options) {
  const width = Math.max(MIN_PLOT_WIDTH, Math.min(MAX_PLOT_WIDTH, Math.floor(options.width || 720)));
  const height = width < 520 ? 290 : 340;
  const pad = { left: 54, right: 16, top: 14, bottom: 46 };
  const root = svgNode("svg", {
    viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "plot", "aria-label": options.ariaLabel,
  });
  const wrapper = document.createElement("div");
  wrapper.className = "plot-wrap";
  wrapper.append(root);
  const shown = points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
  if (!shown.length) return wrapper;

  const xs = [...shown.map((p) => p.x), ...(options.xInclude || []), ...(options.vline ? [options.vline.x] : [])];
  const ys = [...shown.map((p) => p.y), ...(options.yInclude || []), ...(options.hline ? [options.hline.y] : [])];
  const widen = (low, high) => {
    const margin = (high - low) * 0.08 || Math.abs(high) * 0.05 || 0.5;
    return [low - margin, high + margin];
  };
  const [x0, x1] = widen(Math.min(...xs), Math.max(...xs));
  const [y0, y1] = widen(Math.min(...ys), Math.max(...ys));
  const box = { left: pad.left, right: width - pad.right, top: pad.top, bottom: height - pad.bottom };
  const sx = (x) => box.left + ((x - x0) / (x1 - x0)) * (box.right - box.left);
  const sy = (y) => box.bottom - ((y - y0) / (y1 - y0)) * (box.bottom - box.top);

  root.append(svgNode("rect", { x: box.left, y: box.top, width: box.right - box.left, height: box.bottom - box.top, class: "plot-area" }));
  // as many decimals as the tick step needs (1.00×, 1.01×, 1.02× rather than 1.00× four times)
  const decimals = (step) => Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9)));
  const xTicks = niceTicks(x0, x1, width < 520 ? 4 : 6), yTicks = niceTicks(y0, y1, 5);
  for (const x of xTicks.ticks) {
    root.append(svgNode("line", { x1: sx(x), x2: sx(x), y1: box.top, y2: box.bottom, class: "gridline" }));
    root.append(svgNode("text", { x: sx(x), y: box.bottom + 16, class: "tick", "text-anchor": "middle" }, options.xFormat(x, decimals(xTicks.step))));
  }
  for (const y of yTicks.ticks) {
    root.append(svgNode("line", { x1: box.left, x2: box.right, y1: sy(y), y2: sy(y), class: "gridline" }));
    root.append(svgNode("text", { x: box.left - 6, y: sy(y) + 4, class: "tick", "text-anchor": "end" }, options.yFormat(y, decimals(yTicks.step))));
  }
  root.append(svgNode("line", { x1: box.left, y1: box.bottom, x2: box.right, y2: box.bottom, class: "axis" }));
  root.append(svgNode("line", { x1: box.left, y1: box.top, x2: box.left, y2: box.bottom, class: "axis" }));
  root.append(svgNode("text", { x: (box.left + box.right) / 2, y: height - 8, class: "label", "text-anchor": "middle" }, options.xLabel));
  const yMid = (box.top + box.bottom) / 2;
  root.append(svgNode("text", { x: 14, y: yMid, class: "label", transform: `rotate(-90 14 ${yMid})`, "text-anchor": "middle" }, options.yLabel));
  if (options.vline) {
    const limit = svgNode("line", { x1: sx(options.vline.x), x2: sx(options.vline.x), y1: box.top, y2: box.bottom, class: "limit" });
    limit.append(svgNode("title", {}, options.vline.label));
    root.append(limit);
  }
  if (options.hline) {
    const limit = svgNode("line", { x1: box.left, x2: box.right, y1: sy(options.hline.y), y2: sy(options.hline.y), class: "limit" });
    limit.append(svgNode("title", {}, options.hline.label));
    root.append(limit);
  }
  if (options.frontLine) {
    const front = shown.filter((p) => p.kind === "front" || p.kind === "chosen").sort((a, b) => a.x - b.x);
    if (front.length > 1) root.append(svgNode("polyline", { points: front.map((p) => `${sx(p.x)},${sy(p.y)}`).join(" "), class: "front" }));
  }

  // the original first, then the chosen one: they keep their true places; the others give way
  const rank = { original: 0, chosen: 1, front: 2, accepted: 3, rejected: 4 };
  const order = [...shown].sort((a, b) => (rank[a.kind] ?? 5) - (rank[b.kind] ?? 5));
  const spots = placeMarkers(order.map((p) => ({ px: sx(p.x), py: sy(p.y) })), box);
  const leaders = svgNode("g", { class: "leaders" }), marks = svgNode("g", { class: "marks" });
  order.forEach((p, index) => {
    const { px, py, mx, my } = spots[index];
    if (mx !== px || my !== py) {
      leaders.append(svgNode("line", { x1: px, y1: py, x2: mx, y2: my, class: "leader" }));
      leaders.append(svgNode("circle", { cx: px, cy: py, r: 2.5, class: `true-place ${p.kind}` }));
    }
    const group = svgNode("g", { class: `point ${p.kind}`, "data-key": p.key });
    group.append(markerShape(p.kind, mx, my));
    group.append(svgNode("text", { x: mx, y: my + 4, class: "marker-key", "text-anchor": "middle" }, p.key));
    group.append(svgNode("title", {}, p.title));
    marks.append(group);
  });
  root.append(leaders, marks);

  if (options.legend === false) return wrapper; // the page's own table says what each key is
  const table = document.createElement("table");
  table.className = "legend";
  const head = table.createTHead().insertRow();
  for (const text of ["#", ...options.columns]) head.append(Object.assign(document.createElement("th"), { textContent: text }));
  const body = table.createTBody();
  for (const p of points) {
    const row = body.insertRow();
    row.className = `legend-${p.kind}`;
    const key = row.insertCell();
    const swatch = svgNode("svg", { viewBox: "-12 -12 24 24", width: 22, height: 22, class: `swatch point ${p.kind}` });
    swatch.append(markerShape(p.kind, 0, 0), svgNode("text", { x: 0, y: 4, class: "marker-key", "text-anchor": "middle" }, p.key));
    key.append(swatch);
    for (const cell of p.cells) {
      const td = row.insertCell();
      td.append(cell instanceof Node ? cell : document.createTextNode(cell ?? "—"));
    }
  }
  const scroll = document.createElement("div");
  scroll.className = "scroll";
  scroll.append(table);
  wrapper.append(scroll);
  return wrapper;
}

// Draw `render(width)` into `figure` at its current width, and again whenever the window's width
// changes (a phone turned, a window resized): the plot's text stays at its CSS size.
function drawPlot(figure, render) {
  const draw = () => figure.replaceChildren(render(figure.clientWidth || 720));
  draw();
  if (figure.plotListener) window.removeEventListener("resize", figure.plotListener);
  let timer = null;
  let lastWidth = figure.clientWidth;
  figure.plotListener = () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      if (figure.clientWidth !== lastWidth) { lastWidth = figure.clientWidth; draw(); }
    }, 150);
  };
  window.addEventListener("resize", figure.plotListener);
}
