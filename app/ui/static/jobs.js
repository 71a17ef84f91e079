// optiforge web console: the jobs list (filters, compare) and a job's page (progress, best, facts, engines).
// Uses console.js's helpers (api, el, fmt, lineage…); loaded on every page after it.
"use strict";

// ------------------------------------------------------------------ jobs

function progressBar(job) {
  const bar = el("div");
  bar.style.width = `${Math.round(100 * job.progress)}%`; // through CSSOM: the CSP forbids style attributes
  return el("div", { class: "progress small" }, bar);
}

// A job's precision: its recipe's, or for an auto-optimize the best engine's so far.
function jobPrecision(job) {
  if (job.best?.lineage?.precision) return job.best.lineage.precision;
  if (job.kind === "optimize") return job.recipe?.precision ?? "fp32";
  return "—";
}

function compareSelection(checkboxes, button, param) {
  const update = () => {
    const chosen = checkboxes().filter((box) => box.checked).map((box) => box.value);
    button.disabled = chosen.length !== 2;
    button.dataset.href = uiPath(`/compare?${param}=${chosen.map(encodeURIComponent).join(",")}`);
  };
  button.onclick = () => { location.href = button.dataset.href; };
  return update;
}

let jobsTimer = null;
const jobsChosen = new Set();
const JOB_FILTERS = ["status", "kind", "model_id"];

function filterQuery() {
  const filters = $("#job-filters"), query = new URLSearchParams();
  for (const name of JOB_FILTERS) if (filters[name].value) query.set(name, filters[name].value);
  return query;
}

async function jobsPage() {
  const filters = $("#job-filters");
  if (!jobsPage.models) {
    const [models, capabilities] = await Promise.all([listAll("/v1/models"), api("GET", "/v1/capabilities")]);
    jobsPage.models = models;
    filters.kind.append(...capabilities.job_kinds.map((kind) => el("option", { value: kind }, KIND_LABELS[kind] || kind)));
    filters.model_id.append(...models.map((m) => el("option", { value: m.id }, `${m.name} (${m.id})`)));
    // filters in the URL (a bookmark, the back button), now that their options exist
    const params = new URLSearchParams(location.search);
    for (const name of JOB_FILTERS) if (params.get(name)) filters[name].value = params.get(name);
  }
  const query = filterQuery();
  const jobs = await listAll(`/v1/jobs${query.size ? `?${query}` : ""}`);
  const names = Object.fromEntries(jobsPage.models.map((m) => [m.id, m.name]));
  // the API filters; a server without the filters yet returns every job, filtered here the same way
  const shown = jobs.filter((job) => (!query.get("status") || job.status === query.get("status"))
    && (!query.get("kind") || job.kind === query.get("kind")) && (!query.get("model_id") || job.model_id === query.get("model_id")));
  const update = compareSelection(() => $$("#jobs input.pick"), $("#jobs-compare"), "jobs");
  fillRows($("#jobs"), shown.map((job) => el("tr", {},
    el("td", {}, el("input", { type: "checkbox", class: "pick", value: job.id, "aria-label": `compare ${job.id}`,
      checked: jobsChosen.has(job.id), onchange: (event) => {
        if (event.target.checked) jobsChosen.add(job.id); else jobsChosen.delete(job.id);
        update();
      } })),
    el("td", {}, link(uiPath(`/jobs/${seg(job.id)}`), job.id)),
    el("td", {}, el("span", { class: `badge ${job.status}` }, job.status)),
    el("td", {}, kindLabel(job)),
    el("td", {}, fmt.speedup(job.best?.speedup)),
    el("td", {}, jobPrecision(job)),
    el("td", {}, job.model_name ?? names[job.model_id] ?? (job.model_id ? el("code", {}, job.model_id) : "—")),
    el("td", { class: "wide-only" }, progressBar(job)),
    el("td", { class: "muted wide-only" }, job.stage), el("td", { class: "wide-only" }, fmt.when(job.created_at)))));
  $("#jobs-empty").hidden = shown.length > 0;
  update();
  clearTimeout(jobsTimer);
  if (jobs.some((job) => ACTIVE.has(job.status))) jobsTimer = setTimeout(() => jobsPage().catch(reportError), POLL_MS);
}

function setUpJobFilters() {
  const filters = $("#job-filters");
  filters.addEventListener("change", (event) => {
    if (!event.target.matches("select")) return;
    const query = filterQuery();
    history.replaceState(null, "", `${location.pathname}${query.size ? `?${query}` : ""}`);
    jobsPage().catch(reportError);
  });
  filters.addEventListener("submit", (event) => event.preventDefault());
}

const datasetNames = new Map();
async function datasetName(id) {
  if (!id) return "—";
  if (!datasetNames.has(id)) {
    datasetNames.set(id, api("GET", `/v1/datasets/${seg(id)}`).then((d) => `${d.name} (${d.samples} samples)`).catch(() => id));
  }
  return datasetNames.get(id);
}

// How long a job has run and has left: the API's figures, or worked out from its timestamps.
function jobTiming(job) {
  const started = job.started_at ? Date.parse(job.started_at) : null;
  const finished = job.finished_at ? Date.parse(job.finished_at) : null;
  const elapsed = job.elapsed_s ?? (started === null ? null : ((finished ?? Date.now()) - started) / 1000);
  const budget = job.time_budget_s ?? (job.kind === "autotune" ? job.recipe?.time_budget_s : null) ?? null;
  let remaining = job.remaining_s ?? null;
  if (remaining === null && budget !== null && elapsed !== null && job.status === "running") remaining = Math.max(0, budget - elapsed);
  return { elapsed, budget, remaining };
}

//: Said once, wherever a search ended with nothing better than the original (never beside a "Chosen:").
const SERVES_ORIGINAL = "No candidate beats the original within the budget: serve the original.";

// A finished search whose answer is the original itself (its best names no engine).
const servesOriginal = (job) => job.kind === "autotune" && job.status === "succeeded" && job.best
  && ("engine_id" in job.best ? !job.best.engine_id : String(job.best.label).startsWith("original"));

function bestLine(job) {
  const best = job.best;
  if (!best) return null;
  if (servesOriginal(job)) return [el("strong", {}, SERVES_ORIGINAL)];
  const lead = ACTIVE.has(job.status) ? "Best so far" : "Chosen";
  const drop = missing(best.drop) ? "" : `, ${fmt.drop(best.drop)}`;
  return [el("strong", {}, `${lead}: `), resultLabel(best),
    el("span", { class: "figure" }, ` ${fmt.speedup(best.speedup)} speedup${drop}`)];
}

async function jobPage() {
  const id = document.body.dataset.jobId;
  const job = await api("GET", `/v1/jobs/${seg(id)}`);
  const status = $("#job-status");
  status.textContent = job.status;
  status.className = `badge ${job.status}`;
  $("#job-kind").textContent = kindLabel(job);
  $("#job-progress").style.width = `${Math.round(100 * job.progress)}%`;
  $("#job-stage").textContent = job.stage;
  const best = bestLine(job);
  $("#job-best").hidden = !best;
  if (best) $("#job-best").replaceChildren(...best);
  const cancel = $("#job-cancel");
  cancel.hidden = !ACTIVE.has(job.status) || job.cancel_requested;
  const timing = jobTiming(job);
  const [evaluation, calibration] = await Promise.all([datasetName(job.evaluation_dataset_id), datasetName(job.calibration_dataset_id)]);
  facts($("#job-facts"), [
    ["Model", job.model_id ? [job.model_name ?? "", " ", el("code", {}, job.model_id)] : "—"],
    ["Kind", kindLabel(job)],
    ["Evaluation set", evaluation], ["Calibration set", calibration],
    ["Created", fmt.when(job.created_at)], ["Started", fmt.when(job.started_at)], ["Finished", fmt.when(job.finished_at)],
    ["Elapsed", fmt.seconds(timing.elapsed)],
    ...(timing.budget === null ? [] : [["Time budget", fmt.seconds(timing.budget)]]),
    ...(timing.remaining === null ? [] : [["Time left", fmt.seconds(timing.remaining)]]),
    ["Engines", String(job.engine_ids?.length ?? 0)],
  ]);
  $("#job-recipe").textContent = JSON.stringify(job.recipe, null, 2);
  $("#job-messages").replaceChildren(...job.messages.map((m) => el("li", {}, m)));
  $("#job-error").hidden = !job.error;
  if (job.error) $("#job-error").textContent = `${job.error.code}: ${job.error.detail}`;
  if (ACTIVE.has(job.status)) {
    setTimeout(() => jobPage().catch(reportError), POLL_MS);
    return;
  }
  if (job.status !== "succeeded" || jobPage.rendered) return;
  jobPage.rendered = true;
  if (job.kind === "sensitivity") {
    await showImage("#sensitivity-section", "#sensitivity-plot", `/v1/jobs/${seg(id)}/sensitivity?format=png`);
    return;
  }
  if (job.kind !== "optimize" && job.kind !== "autotune") return;
  const [report, engines, search] = await Promise.all([
    api("GET", `/v1/jobs/${seg(id)}/report`), listAll(`/v1/engines?job_id=${encodeURIComponent(id)}`),
    job.kind === "autotune" ? api("GET", `/v1/jobs/${seg(id)}/autotune`).catch(() => null) : null,
  ]);
  renderReport(report, engines, servesOriginal(job) || search?.serves_original);
  if (search) renderSearch(search);
  renderJobEngines(engines);
}

function renderJobEngines(engines) {
  $("#engines-section").hidden = false;
  const update = compareSelection(() => $$("#job-engines input.pick"), $("#engines-compare"), "engines");
  fillRows($("#job-engines"), engines.map((e) => el("tr", {},
    el("td", {}, el("input", { type: "checkbox", class: "pick", value: e.id, "aria-label": `compare ${e.id}`, onchange: update })),
    el("td", {}, link(uiPath(`/engines/${seg(e.id)}`), e.id)), el("td", { class: "lineage" }, engineLineage(e)),
    el("td", {}, e.alias || "—"), el("td", {}, fmt.mb(e.size_bytes)),
    el("td", {}, deleteButton(`engine ${e.id}`, `/v1/engines/${seg(e.id)}`, "Its files go; the job's report loses its row.",
      () => location.reload())))));
  update();
}

function setUpJobActions() {
  const id = document.body.dataset.jobId;
  $("#job-cancel").addEventListener("click", async () => {
    try {
      await api("POST", `/v1/jobs/${seg(id)}/cancel`);
      flash("cancel requested");
    } catch (error) {
      reportError(error);
    }
  });
  $("#job-delete").addEventListener("click", () => confirmDelete(`job ${id}`, `/v1/jobs/${seg(id)}`,
    "Its engines (and their files) and its report are deleted with it.", () => { location.href = uiPath("/jobs"); }));
}

async function showImage(sectionSelector, imageSelector, path) {
  try {
    const blob = await api("GET", path, { as: "blob" });
    $(imageSelector).src = URL.createObjectURL(blob);
    $(sectionSelector).hidden = false;
  } catch (error) {
    reportError(error);
  }
}
