// optiforge web console: two jobs or two engines side by side.
// Uses console.js's helpers (api, el, fmt, lineage…); loaded on every page after it.
"use strict";

// ------------------------------------------------------------------ two jobs or two engines, side by side

const ID_PATTERN = /^[a-z]+_[0-9a-f]{1,32}$/;

// A nested object as "a.b.c" → value rows (a recipe's every setting, for a side-by-side diff).
function flatten(value, prefix = "", out = {}) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const [key, inner] of Object.entries(value)) flatten(inner, prefix ? `${prefix}.${key}` : key, out);
  } else {
    out[prefix] = Array.isArray(value) ? value.join(", ") : value === null || value === undefined ? "—" : String(value);
  }
  return out;
}

function jobColumn(job) {
  const timing = jobTiming(job);
  const rows = {
    Job: link(uiPath(`/jobs/${seg(job.id)}`), job.id), Status: job.status, Kind: kindLabel(job),
    Model: job.model_name ?? job.model_id ?? "—", Precision: jobPrecision(job),
    "Best speedup": fmt.speedup(job.best?.speedup), "Best drop": fmt.drop(job.best?.drop),
    "Best lineage": job.best ? resultLabel(job.best) : "—",
    "Evaluation set": job.evaluation_dataset_id ?? "—", "Calibration set": job.calibration_dataset_id ?? "—",
    Elapsed: fmt.seconds(timing.elapsed), Engines: String(job.engine_ids?.length ?? 0),
  };
  for (const [key, value] of Object.entries(flatten(job.recipe || {}))) rows[`recipe.${key}`] = value;
  return rows;
}

function engineColumn(engine) {
  const accuracy = engine.metrics.accuracy || {};
  const vs = engine.metrics.vs_baseline || {};
  const rows = {
    Engine: link(uiPath(`/engines/${seg(engine.id)}`), engine.id), Lineage: engineLineage(engine),
    Backend: engine.backend, Precision: engine.precision, Job: link(uiPath(`/jobs/${seg(engine.job_id)}`), engine.job_id),
    Size: fmt.mb(engine.size_bytes), "Build time": missing(engine.build_seconds) ? "—" : `${engine.build_seconds.toFixed(1)} s`,
    "Top-1": fmt.pct(accuracy.top1), "Δ top-1": fmt.pt(vs.top1_delta),
    Agreement: fmt.pct(accuracy.fidelity?.top1_agreement), Alias: engine.alias || "—",
  };
  for (const key of Object.keys(engine.metrics.latency || {}).sort(byLatencyShape)) {
    rows[`p50 ${latencyLabel(key)} ms`] = fmt.ms(engine.metrics.latency[key].p50_ms);
    rows[`Speedup ${latencyLabel(key)}`] = fmt.speedup(vs.speedup?.[key]);
  }
  return rows;
}

async function comparePage() {
  const params = new URLSearchParams(location.search);
  const kind = params.has("engines") ? "engines" : params.has("jobs") ? "jobs" : null;
  const ids = kind ? params.get(kind).split(",").filter((id) => ID_PATTERN.test(id)).slice(0, 2) : [];
  if (ids.length !== 2) {
    $("#compare-help").hidden = false;
    return;
  }
  const records = await Promise.all(ids.map((id) => api("GET", `/v1/${kind}/${seg(id)}`)));
  const columns = records.map(kind === "jobs" ? jobColumn : engineColumn);
  $("#compare-title").textContent = kind === "jobs" ? "Two jobs side by side" : "Two engines side by side";
  const names = [...new Set(columns.flatMap((column) => Object.keys(column)))];
  const text = (value) => (value instanceof Node ? value.textContent : value ?? "—");
  $("#compare").replaceChildren(
    el("thead", {}, el("tr", {}, el("th", {}, ""), ...ids.map((id) => el("th", {}, id)))),
    el("tbody", {}, names.map((name) => {
      const values = columns.map((column) => column[name]);
      const differ = name !== "Job" && name !== "Engine" && text(values[0]) !== text(values[1]);
      return el("tr", { class: differ ? "differs" : "" }, el("th", { scope: "row" }, name, differ ? el("span", { class: "sr-only" }, " (differs)") : ""),
        ...values.map((value) => el("td", {}, value ?? "—")));
    })));
}
