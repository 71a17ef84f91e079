// optiforge web console: a finished job's comparison table and plot, and an auto-optimize search's candidates.
// Uses console.js's helpers (api, el, fmt, lineage…); loaded on every page after it.
"use strict";

// The accuracy a report plots and compares: top-1, else agreement with the original, else the cosine
// with the original (embeddings and hidden states have no classes to agree on).
function accuracyMeasure(rows) {
  return rows.some((r) => r.top1 != null) ? "top1"
    : rows.some((r) => r.top1_agreement != null) ? "top1_agreement" : "cosine_similarity";
}
const MEASURE_LABELS = { top1: "top-1 (%)", top1_agreement: "agreement with the original (%)", cosine_similarity: "cosine with the original (×100)" };

function rowSpeedup(row, shape, original) {
  if (row.engine === "original") return 1;
  const stated = row.speedup?.[shape];
  if (!missing(stated)) return stated;
  const own = row.latency?.[shape]?.p50_ms, base = original?.latency?.[shape]?.p50_ms;
  return own && base ? base / own : null;
}

// The comparison table, as the API's report gives it: one row per runner with its lineage, latency
// and speedup per batch size (or per batch size and sequence length), accuracy; then the plot.
function renderReport(report, engines, originalServed = false) {
  $("#report-section").hidden = false;
  const hw = report.hardware || {};
  $("#report-hardware").textContent = [hw.cpu_model, hw.threads && `${hw.threads} threads`, hw.runtime_version]
    .filter(Boolean).join(" · ");
  const byId = Object.fromEntries(engines.map((e) => [e.id, e]));
  const original = report.rows.find((row) => row.engine === "original");
  const sizes = [...new Set(report.rows.flatMap((row) => Object.keys(row.latency)))].sort(byLatencyShape);
  const rowLineage = (row) => (row.engine === "original"
    ? `${row.precision} ${row.backend} (the uploaded model)`
    : row.lineage ? lineageText(row.lineage, row) : byId[row.engine] ? engineLineage(byId[row.engine]) : `${row.precision} ${row.backend}`);
  const head = ["#", "Engine", "Lineage",
    ...sizes.map(latencyLabel).flatMap((b) => [`p50 ${b} ms`, `p99 ${b} ms`, `Speedup ${b}`]),
    "Top-1", "Δ top-1", "Agreement", "Size"];
  const keys = new Map(report.rows.map((row, index) => [row, row.engine === "original" ? "O" : String(index)]));
  const rows = report.rows.map((row) => el("tr", { class: row.engine === "original" ? "original" : "" },
    el("td", {}, keys.get(row)),
    el("td", {}, row.engine === "original" ? "original" : link(uiPath(`/engines/${seg(row.engine)}`), row.engine)),
    el("td", { class: "lineage" }, rowLineage(row)),
    ...sizes.flatMap((b) => {
      const stats = row.latency[b] || {};
      return [el("td", {}, fmt.ms(stats.p50_ms)), el("td", {}, fmt.ms(stats.p99_ms)), el("td", {}, fmt.speedup(rowSpeedup(row, b, original)))];
    }),
    el("td", {}, fmt.pct(row.top1)), el("td", {}, fmt.pt(row.top1_delta)), el("td", {}, fmt.pct(row.top1_agreement)),
    el("td", {}, missing(row.size_mb) ? "—" : `${row.size_mb.toFixed(2)} MB`)));
  $("#report").replaceChildren(el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), el("tbody", {}, rows));

  const shape = sizes[0];
  const measure = accuracyMeasure(report.rows);
  const accuracyOf = (row) => row[measure] ?? (row.engine === "original" ? 1 : null);
  const kindOf = (row) => {
    if (row.engine === "original") return "original";
    const tune = byId[row.engine]?.build_info?.autotune;
    return tune?.chosen && !originalServed && !tune.serves_original ? "chosen" : tune?.on_front || tune?.chosen ? "front" : "accepted";
  };
  const points = report.rows.map((row) => {
    const x = rowSpeedup(row, shape, original), y = accuracyOf(row);
    return {
      x, y: missing(y) ? null : 100 * y, kind: kindOf(row), key: keys.get(row),
      title: `${rowLineage(row)} · ${fmt.speedup(x)} · ${fmt.pct(y)}`,
      cells: [rowLineage(row), fmt.speedup(x), fmt.pct(y), row.engine === "original" ? "original" : link(uiPath(`/engines/${seg(row.engine)}`), row.engine)],
    };
  });
  drawPlot($("#plot"), (width) => scatterPlot(points, {
    width, xInclude: [1], xFormat: (x, d) => `${x.toFixed(Math.max(1, d))}×`, yFormat: (y, d) => y.toFixed(d),
    xLabel: `speedup at ${latencyAt(shape)} (×, higher is faster)`, yLabel: MEASURE_LABELS[measure],
    ariaLabel: `speedup at ${latencyAt(shape)} against accuracy`, frontLine: true,
    columns: ["Lineage", "Speedup", MEASURE_LABELS[measure].replace(" (%)", "").replace(" (×100)", ""), "Engine"],
  }));
}

const OUTCOMES = {
  accepted: "within budget", rejected_accuracy: "over the budget", slower: "slower", failed: "failed",
  skipped_time: "skipped: no time left", skipped_limit: "skipped: evaluation limit", held_back: "held back",
  not_applicable: "not applicable",
};
const COST_GAIN = { latency: "speedup", throughput: "throughput speedup", size: "size reduction" };

// A candidate's speedup: from the final side-by-side timing (accepted, chosen), else from the quick
// timing beside the original (marked so); the cost is per the objective (latency, 1/throughput, size).
function candidateSpeedup(row, originalCost) {
  if ((row.status === "accepted" || row.chosen) && row.cost) return { value: originalCost / row.cost, quick: false };
  if (row.quick_ratio) return { value: 1 / row.quick_ratio, quick: true };
  return { value: null, quick: false };
}

// An auto-optimize search: one sentence of outcome (never two that disagree), the plot of speedup
// against accuracy drop with the budget, every candidate with its lineage and why.
function renderSearch(search) {
  $("#autotune-section").hidden = false;
  const objective = search.objective || {};
  const gain = COST_GAIN[objective.metric] || "speedup";
  const at = `batch ${objective.batch_size}${objective.sequence_length ? `, sequence ${objective.sequence_length}` : ""}`;
  const budgetPt = 100 * (search.allowed_drop ?? search.budget?.max_drop ?? 0);
  const chosenRow = search.serves_original ? null : search.candidates.find((row) => row.chosen);
  const chosen = (row) => row === chosenRow;
  const outcome = !chosenRow
    ? SERVES_ORIGINAL
    : `Chosen: ${resultLabel(chosenRow)}, ${fmt.speedup(candidateSpeedup(chosenRow, search.original.cost).value)} ${gain}, ${fmt.drop(chosenRow.drop)}.`;
  $("#autotune-summary").replaceChildren(el("strong", {}, outcome),
    ` Objective: ${objective.metric} at ${at}; budget: at most ${budgetPt.toFixed(2)} pt of ${search.budget?.metric}`
    + `${search.budget?.relative ? " (relative)" : ""}; searched for ${fmt.seconds(search.elapsed_s)}`
    + `${search.timed_out ? " (the time budget ran out)" : ""}.`);
  const label = resultLabel;
  const candidates = search.candidates.map((row, index) => ({ row, key: String(index + 1), speed: candidateSpeedup(row, search.original.cost) }));
  const kindOf = (row) => (chosen(row) ? "chosen" : row.on_front ? "front" : row.within_budget ? "accepted" : "rejected");
  // with the original served, the candidate the search marked chosen is the original's own build
  const outcomeOf = (row) => (chosen(row) ? "chosen" : row.chosen ? "as the original (served)" : OUTCOMES[row.status] || row.status);
  const points = [
    { x: 1, y: 0, kind: "original", key: "O", title: "the original: 1.00×, no drop", cells: ["the original", "reference", "1.00×", "±0.00 pt", "", ""] },
    ...candidates.filter(({ row, speed }) => !missing(speed.value) && !missing(row.drop)).map(({ row, key, speed }) => ({
      x: speed.value, y: 100 * row.drop, kind: kindOf(row), key,
      title: `${label(row)} · ${fmt.speedup(speed.value)}${speed.quick ? " (quick)" : ""} · ${fmt.drop(row.drop)}`,
      cells: [label(row), outcomeOf(row),
        `${fmt.speedup(speed.value)}${speed.quick ? " (quick)" : ""}`, fmt.drop(row.drop), row.on_front ? "yes" : "", row.reason || ""],
    })),
  ];
  drawPlot($("#autotune-plot"), (width) => scatterPlot(points, {
    width, xInclude: [1], yInclude: [0, budgetPt], xFormat: (x, d) => `${x.toFixed(Math.max(1, d))}×`, yFormat: (y, d) => y.toFixed(d),
    xLabel: `${gain} at ${at} (×, higher is better)`, yLabel: `accuracy drop (${search.budget?.metric}, pt)`,
    hline: { y: budgetPt, label: `the budget: ${budgetPt.toFixed(2)} pt` }, frontLine: true,
    ariaLabel: `${gain} against accuracy drop, every scored candidate`,
    legend: false,
  }));
  const originalRow = el("tr", { class: "original" }, el("td", {}, "O"),
    el("td", { class: "lineage" }, `${search.original.backend || "onnxruntime-cpu"} fp32 (the uploaded model)`), el("td", {}, "reference"),
    el("td", {}, "1.00×"), el("td", {}, "±0.00 pt"), el("td", {}, ""), el("td", {}, ""));
  const headings = ["#", "Candidate (lineage)", "Outcome", gain[0].toUpperCase() + gain.slice(1), "Δ accuracy", "Front", "Why"];
  $("#autotune-candidates").replaceChildren(
    el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))),
    el("tbody", {}, originalRow, candidates.map(({ row, key, speed }) => el("tr", { class: chosen(row) ? "chosen" : "" },
      el("td", {}, key), el("td", { class: "lineage" }, label(row)),
      el("td", {}, outcomeOf(row)),
      el("td", {}, missing(speed.value) ? "—" : `${fmt.speedup(speed.value)}${speed.quick ? " (quick)" : ""}`),
      el("td", {}, fmt.drop(row.drop)), el("td", {}, row.on_front ? "yes" : ""),
      el("td", { class: "why" }, row.reason || (row.status === "skipped_time" && row.estimated_seconds ? `would take about ${fmt.seconds(row.estimated_seconds)}` : "")))),
  ));
  labelCells($("#autotune-candidates"), headings);
  $("#autotune-messages").replaceChildren(...(search.messages || []).map((m) => el("li", {}, m)));
}

// Each cell names its column (data-label): on a narrow screen the table stacks, one card per row,
// each value under its heading (console.css), so a long "why" needs no sideways scrolling.
function labelCells(table, headings) {
  for (const row of table.tBodies[0].rows) [...row.cells].forEach((cell, index) => cell.setAttribute("data-label", headings[index]));
  table.classList.add("stacks");
}
