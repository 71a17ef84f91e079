// optiforge web console: every figure comes from the public API (/v1, /v2), called with the API
// key the person typed (kept in this tab's sessionStorage, sent as `Authorization: Bearer`).
// No build step, no framework: one page module per template, chosen by <body data-page>.
"use strict";

const KEY_STORAGE = "optiforge-api-key";
const POLL_MS = 2000;

// ------------------------------------------------------------------ the API

class ApiError extends Error {
  constructor(status, code, detail) {
    super(`${status} ${code}: ${detail}`);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

async function api(method, path, { json, form, body, headers = {}, as = "json" } = {}) {
  const options = { method, headers: { ...headers } };
  const key = apiKey();
  if (key) options.headers.Authorization = `Bearer ${key}`;
  if (json !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(json);
  } else if (form !== undefined) {
    options.body = form;
  } else if (body !== undefined) {
    options.body = body;
  }
  const response = await fetch(path, options);
  if (!response.ok) {
    let error = {};
    try { error = await response.json(); } catch (_) { /* not JSON */ }
    const failure = new ApiError(response.status, error.code || "http_error", error.detail || error.error || response.statusText);
    if (response.status === 401) showKeyPrompt(failure.detail);
    throw failure;
  }
  if (as === "blob") return response.blob();
  if (as === "response") return response;
  if (response.status === 204) return null;
  return response.json();
}

// Every record of a listing: the server answers a page at a time, naming the next in X-Next-Cursor.
async function listAll(path) {
  const records = [];
  const base = `${path}${path.includes("?") ? "&" : "?"}limit=1000`;
  let url = base;
  for (;;) {
    const response = await api("GET", url, { as: "response" });
    records.push(...await response.json());
    const cursor = response.headers.get("X-Next-Cursor");
    if (!cursor) return records;
    url = `${base}&cursor=${encodeURIComponent(cursor)}`;
  }
}

// ------------------------------------------------------------------ small DOM helpers

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fillRows(table, rows) {
  const tbody = table.tBodies[0] || table.appendChild(el("tbody"));
  tbody.replaceChildren(...rows);
}

function flash(message, kind = "info") {
  const box = $("#flash");
  box.textContent = message;
  box.className = kind;
  box.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { box.hidden = true; }, kind === "error" ? 12000 : 5000);
}

function reportError(error) {
  if (error instanceof ApiError && error.status === 401) return; // the key prompt says it
  flash(error instanceof ApiError ? `${error.code}: ${error.detail}` : String(error), "error");
}

const fmt = {
  ms: (v) => (v === null || v === undefined ? "—" : Number(v).toFixed(3)),
  pct: (v) => (v === null || v === undefined ? "—" : `${(100 * v).toFixed(2)} %`),
  pt: (v) => (v === null || v === undefined ? "—" : `${v >= 0 ? "+" : ""}${(100 * v).toFixed(2)} pt`),
  ratio: (v) => (v === null || v === undefined ? "—" : `${Number(v).toFixed(2)}×`),
  mb: (bytes) => (bytes === null || bytes === undefined ? "—" : `${(bytes / 1e6).toFixed(2)} MB`),
  int: (v) => (v === null || v === undefined ? "—" : Number(v).toLocaleString("en")),
  when: (iso) => (iso ? new Date(iso).toLocaleString() : "—"),
  shape: (dims) => `[${dims.map((d) => (d === null ? "?" : d)).join(", ")}]`,
};

// A latency key as the API writes it: "8" (batch 8) or "8x128" (batch 8, sequence length 128, for a
// model measured at sequence lengths); sorted by batch, then length, and labelled as people read it.
const latencyShape = (key) => {
  const [batch, length] = String(key).split("x").map(Number);
  return { batch, length: Number.isFinite(length) ? length : null };
};
const byLatencyShape = (a, b) => {
  const x = latencyShape(a), y = latencyShape(b);
  return x.batch - y.batch || (x.length ?? 0) - (y.length ?? 0);
};
const latencyLabel = (key) => {
  const { batch, length } = latencyShape(key);
  return length === null ? `b=${batch}` : `b=${batch} s=${length}`;
};
const latencyAt = (key) => {
  const { batch, length } = latencyShape(key);
  return length === null ? `batch ${batch}` : `batch ${batch}, sequence ${length}`;
};

const link = (href, text) => el("a", { href }, text);
// Every id put into a path is one path segment, encoded: an id taken from the page's URL could
// otherwise carry `\`, `/` or `?` and aim the request at another path with the visitor's key.
const seg = (id) => encodeURIComponent(id);
const uiPath = (suffix) => `/ui${suffix}`;

// ------------------------------------------------------------------ the API key

function showKeyPrompt(reason) {
  $("#key-input").hidden = false;
  $("#key-save").hidden = false;
  $("#key-forget").hidden = !apiKey();
  $("#who").textContent = reason ? `${reason}: ` : "";
}

async function whoAmI() {
  try {
    const me = await api("GET", "/v1/auth/me");
    $("#who").textContent = me.key_id
      ? `project ${me.project} · key ${me.key_id} (${me.scopes.join(", ")})`
      : "no API key needed: this server has none yet (loopback only)";
    $("#key-forget").hidden = !apiKey();
    $("#key-input").hidden = $("#key-save").hidden = true;
    return me;
  } catch (error) {
    reportError(error);
    return null;
  }
}

function setUpKeyForm() {
  $("#key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("#key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("#key-input").value = "";
    if (await whoAmI()) location.reload();
  });
  $("#key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    location.reload();
  });
}

// ------------------------------------------------------------------ overview: models, datasets, a job

async function overviewPage() {
  const [models, datasets, capabilities] = await Promise.all([
    listAll("/v1/models"), listAll("/v1/datasets"), api("GET", "/v1/capabilities"),
  ]);
  fillRows($("#models"), models.map((m) => el("tr", {},
    el("td", {}, m.name), el("td", {}, el("code", {}, m.id)),
    el("td", {}, el("span", { class: `badge ${m.status === "ready" ? "succeeded" : m.status === "failed" ? "failed" : "running"}`,
      title: m.error ? `${m.error.code}: ${m.error.detail}` : undefined }, m.status || "ready")),
    el("td", {}, m.inputs.map((i) => `${i.name} ${i.dtype} ${fmt.shape(i.shape)}`).join("; ")),
    el("td", {}, fmt.int(m.parameters)), el("td", {}, fmt.mb(m.size_bytes)), el("td", {}, fmt.when(m.created_at)))));
  fillRows($("#datasets"), datasets.map((d) => el("tr", {},
    el("td", {}, d.name), el("td", {}, el("code", {}, d.id)), el("td", {}, fmt.int(d.samples)),
    el("td", {}, d.has_labels ? `${d.classes ?? "?"} classes` : "none"),
    el("td", {}, Object.entries(d.arrays || {}).map(([name, a]) => `${name} ${a.dtype} ${fmt.shape(a.shape)}`).join("; ")),
    el("td", {}, d.image_folder ? `${d.image_folder.images} images, ${imageSpec(d.image_folder.preprocessing)}` : ".npz",
      (d.status || "ready") === "ready" ? "" : el("span", { class: `badge ${d.status === "failed" ? "failed" : "running"}`,
        title: d.error ? `${d.error.code}: ${d.error.detail}` : `decoded by job ${d.processing_job_id}` }, d.status)),
    el("td", {}, fmt.when(d.created_at)))));

  const form = $("#start-job");
  form.model_id.replaceChildren(...models.filter((m) => (m.status || "ready") === "ready").map((m) => el("option", { value: m.id }, `${m.name} (${m.id})`)));
  for (const select of [form.evaluation_dataset_id, form.calibration_dataset_id]) {
    select.replaceChildren(el("option", { value: "" }, "none"),
      ...datasets.filter((d) => (d.status || "ready") === "ready")
        .map((d) => el("option", { value: d.id }, `${d.name} (${d.samples} samples)`)));
  }
  form.precision.replaceChildren(...capabilities.precisions.map((p) => el("option", { value: p }, p)));
  form.targets.replaceChildren(...capabilities.backends.filter((b) => b.queue === "cpu" || b.available_here)
    .map((b, index) => el("option", { value: b.name, selected: index === 0 }, b.name)));
}

function imageSpec(spec) {
  return `${spec.size.join("×")} ${spec.channel_order} ${spec.layout} ${spec.dtype}`;
}

function setUpUploads() {
  for (const [formId, path, what] of [["#upload-model", "/v1/models", "model"], ["#upload-dataset", "/v1/datasets", "dataset"]]) {
    $(formId).addEventListener("submit", async (event) => {
      event.preventDefault();
      const form = event.target;
      const data = new FormData(form);
      for (const field of ["name", "preprocessing"]) if (!data.get(field)) data.delete(field);
      const button = $("button", form);
      button.disabled = true;
      try {
        const made = await api("POST", path, { form: data });
        const pending = made.status === "processing" || made.status === "converting";
        flash(`${what} ${made.name} stored as ${made.id}` + (pending ? `: ${made.status} (job ${made.processing_job_id || made.conversion_job_id})` : ""));
        form.reset();
        await overviewPage();
      } catch (error) {
        reportError(error);
      } finally {
        button.disabled = false;
      }
    });
  }
  $("#start-job").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const recipe = {
      precision: form.precision.value,
      targets: [...form.targets.selectedOptions].map((o) => o.value),
      batch_sizes: form.batch_sizes.value.split(",").map((s) => parseInt(s, 10)).filter((n) => n > 0),
    };
    const body = { model_id: form.model_id.value, recipe };
    if (form.evaluation_dataset_id.value) body.evaluation_dataset_id = form.evaluation_dataset_id.value;
    if (form.calibration_dataset_id.value) body.calibration_dataset_id = form.calibration_dataset_id.value;
    try {
      const job = await api("POST", "/v1/jobs", { json: body });
      location.href = uiPath(`/jobs/${seg(job.id)}`);
    } catch (error) {
      reportError(error);
    }
  });
}

// ------------------------------------------------------------------ jobs

function progressBar(job) {
  const bar = el("div");
  bar.style.width = `${Math.round(100 * job.progress)}%`; // through CSSOM: the CSP forbids style attributes
  return el("div", { class: "progress small" }, bar);
}

async function jobsPage() {
  const jobs = await listAll("/v1/jobs");
  fillRows($("#jobs"), jobs.map((job) => el("tr", {},
    el("td", {}, link(uiPath(`/jobs/${seg(job.id)}`), job.id)), el("td", {}, job.kind), el("td", {}, el("code", {}, job.model_id)),
    el("td", {}, el("span", { class: `badge ${job.status}` }, job.status)), el("td", {}, progressBar(job)),
    el("td", { class: "muted" }, job.stage), el("td", {}, fmt.when(job.created_at)))));
  if (jobs.some((job) => job.status === "queued" || job.status === "running")) setTimeout(() => jobsPage().catch(reportError), POLL_MS);
}

async function jobPage() {
  const id = document.body.dataset.jobId;
  const job = await api("GET", `/v1/jobs/${seg(id)}`);
  const status = $("#job-status");
  status.textContent = job.status;
  status.className = `badge ${job.status}`;
  $("#job-progress").style.width = `${Math.round(100 * job.progress)}%`;
  $("#job-stage").textContent = job.stage;
  const cancel = $("#job-cancel");
  cancel.hidden = !(job.status === "queued" || job.status === "running") || job.cancel_requested;
  $("#job-messages").replaceChildren(...job.messages.map((m) => el("li", {}, m)));
  if (job.error) {
    $("#job-error").hidden = false;
    $("#job-error").textContent = `${job.error.code}: ${job.error.detail}`;
  }
  if (job.status === "queued" || job.status === "running") {
    setTimeout(() => jobPage().catch(reportError), POLL_MS);
    return;
  }
  if (job.status !== "succeeded") return;
  if (job.kind === "sensitivity") {
    await showImage("#sensitivity-section", "#sensitivity-plot", `/v1/jobs/${seg(id)}/sensitivity?format=png`);
    return;
  }
  const [report, engines] = await Promise.all([
    api("GET", `/v1/jobs/${seg(id)}/report`), listAll(`/v1/engines?job_id=${encodeURIComponent(id)}`),
  ]);
  renderReport(report, frontOf(engines));
  if (job.kind === "autotune") await showImage("#autotune-section", "#autotune-plot", `/v1/jobs/${seg(id)}/autotune?format=png`);
  $("#engines-section").hidden = false;
  fillRows($("#job-engines"), engines.map((e) => el("tr", {},
    el("td", {}, link(uiPath(`/engines/${seg(e.id)}`), e.id)), el("td", {}, e.backend), el("td", {}, e.precision),
    el("td", {}, e.alias || "—"), el("td", {}, fmt.mb(e.size_bytes)))));
}

function setUpCancel() {
  $("#job-cancel").addEventListener("click", async () => {
    try {
      await api("POST", `/v1/jobs/${seg(document.body.dataset.jobId)}/cancel`);
      flash("cancel requested");
    } catch (error) {
      reportError(error);
    }
  });
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

// The comparison table, as the API's report gives it: one row per runner, latency per batch size
// (or per batch size and sequence length).
function renderReport(report, front) {
  $("#report-section").hidden = false;
  const hw = report.hardware || {};
  $("#report-hardware").textContent = [hw.cpu_model, hw.threads && `${hw.threads} threads`, hw.runtime_version]
    .filter(Boolean).join(" · ");
  const sizes = [...new Set(report.rows.flatMap((row) => Object.keys(row.latency)))].sort(byLatencyShape);
  const head = ["Engine", "Precision", "Backend",
    ...sizes.map(latencyLabel).flatMap((b) => [`p50 ${b} ms`, `p99 ${b} ms`, `Speedup ${b}`]),
    "Top-1", "Δ top-1", "Agreement", "Size"];
  const rows = report.rows.map((row) => el("tr", { class: row.engine === "original" ? "original" : "" },
    el("td", {}, row.engine === "original" ? "original" : link(uiPath(`/engines/${seg(row.engine)}`), row.engine)),
    el("td", {}, row.precision), el("td", {}, row.backend),
    ...sizes.flatMap((b) => {
      const stats = row.latency[b] || {};
      return [el("td", {}, fmt.ms(stats.p50_ms)), el("td", {}, fmt.ms(stats.p99_ms)),
        el("td", {}, row.speedup ? fmt.ratio(row.speedup[b]) : "—")];
    }),
    el("td", {}, fmt.pct(row.top1)), el("td", {}, fmt.pt(row.top1_delta)), el("td", {}, fmt.pct(row.top1_agreement)),
    el("td", {}, row.size_mb === null ? "—" : `${row.size_mb.toFixed(2)} MB`)));
  $("#report").replaceChildren(el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), el("tbody", {}, rows));
  $("#plot").replaceChildren(latencyAccuracyPlot(report.rows, sizes[0], front));
}

// The engines of an auto-optimize job on its Pareto front (each engine's build_info says).
function frontOf(engines) {
  return new Set(engines.filter((e) => e.build_info?.autotune?.on_front || e.build_info?.autotune?.chosen).map((e) => e.id));
}

// Latency (p50 at the smallest batch) against accuracy (top-1, else agreement with the original, else
// the cosine with the original: embeddings and hidden states have no classes to agree on),
// as an inline SVG: the original marked, the Pareto front highlighted when the job is an auto-optimize.
function latencyAccuracyPlot(rows, batch, front) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = (tag, attributes = {}, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const measure = rows.some((r) => r.top1 != null) ? "top1"
    : rows.some((r) => r.top1_agreement != null) ? "top1_agreement" : "cosine_similarity";
  const accuracyOf = (row) => (row[measure] ?? (row.engine === "original" ? 1 : null));
  const points = rows.map((row) => ({ row, x: row.latency[batch]?.p50_ms, y: accuracyOf(row) }))
    .filter((p) => p.x !== undefined && p.y !== null);
  const width = 720, height = 360, pad = { left: 64, right: 150, top: 16, bottom: 48 };
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "plot",
    "aria-label": `p50 latency at ${latencyAt(batch)} against accuracy` });
  if (!points.length) return root;
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  const [x0, x1] = [0, Math.max(...xs) * 1.1], [y0, y1] = [Math.min(...ys) - 0.01, Math.max(...ys) + 0.005];
  const sx = (x) => pad.left + ((x - x0) / (x1 - x0 || 1)) * (width - pad.left - pad.right);
  const sy = (y) => height - pad.bottom - ((y - y0) / (y1 - y0 || 1)) * (height - pad.top - pad.bottom);
  root.append(svg("line", { x1: pad.left, y1: height - pad.bottom, x2: width - pad.right, y2: height - pad.bottom, class: "axis" }));
  root.append(svg("line", { x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom, class: "axis" }));
  for (let i = 0; i <= 4; i++) {
    const x = x0 + ((x1 - x0) * i) / 4, y = y0 + ((y1 - y0) * i) / 4;
    root.append(svg("text", { x: sx(x), y: height - pad.bottom + 16, class: "tick", "text-anchor": "middle" }, x.toFixed(3)));
    root.append(svg("text", { x: pad.left - 6, y: sy(y) + 4, class: "tick", "text-anchor": "end" }, (100 * y).toFixed(1)));
  }
  root.append(svg("text", { x: (width + pad.left) / 2, y: height - 8, class: "label", "text-anchor": "middle" }, `p50 latency at ${latencyAt(batch)} (ms)`));
  root.append(svg("text", { x: 14, y: (height - pad.bottom) / 2, class: "label", transform: `rotate(-90 14 ${(height - pad.bottom) / 2})`, "text-anchor": "middle" },
    { top1: "top-1 (%)", top1_agreement: "agreement with the original (%)",
      cosine_similarity: "cosine with the original (×100)" }[measure]));
  const onFront = points.filter((p) => front.has(p.row.engine)).sort((a, b) => a.x - b.x);
  if (onFront.length > 1) {
    root.append(svg("polyline", { points: onFront.map((p) => `${sx(p.x)},${sy(p.y)}`).join(" "), class: "front" }));
  }
  // The original last, so that an engine exactly as fast and accurate does not hide it.
  points.sort((a, b) => (a.row.engine === "original") - (b.row.engine === "original"));
  points.forEach((p, index) => {
    const original = p.row.engine === "original";
    const classes = ["point", original ? "original" : "", front.has(p.row.engine) ? "on-front" : ""].join(" ");
    const mark = original
      ? svg("rect", { x: sx(p.x) - 6, y: sy(p.y) - 6, width: 12, height: 12, class: classes })
      : svg("circle", { cx: sx(p.x), cy: sy(p.y), r: 6, class: classes });
    mark.append(svg("title", {}, `${p.row.engine} · ${p.row.backend} ${p.row.precision} · ${fmt.ms(p.x)} ms · ${fmt.pct(p.y)}`));
    root.append(mark);
    // Points close together (an engine as fast and accurate as the original) get labels one under another.
    const label = original ? "original" : `${p.row.precision} ${p.row.backend}`;
    root.append(svg("text", { x: sx(p.x) + 9, y: sy(p.y) - 8 + 13 * index, class: "point-label" }, label));
  });
  return root;
}

// ------------------------------------------------------------------ an engine

async function enginePage() {
  const id = document.body.dataset.engineId;
  const [engine, metadata] = await Promise.all([
    api("GET", `/v1/engines/${seg(id)}`), api("GET", `/v2/models/${seg(id)}`).catch(() => null),
  ]);
  const facts = {
    Backend: engine.backend, Precision: engine.precision, Job: link(uiPath(`/jobs/${seg(engine.job_id)}`), engine.job_id),
    Model: engine.model_id, Alias: engine.alias || "—", Size: fmt.mb(engine.size_bytes),
    "Build time": `${engine.build_seconds.toFixed(1)} s`,
    Batching: engine.batching ? `max ${engine.batching.max_batch_size}, ${engine.batching.max_queue_delay_ms} ms` : "off",
    "Largest request": engine.max_batch ? `${engine.max_batch} samples (more: 413 batch_too_large)` : "—",
    Hardware: [engine.hardware.cpu_model, engine.hardware.gpu_model].filter(Boolean).join(" · ") || "—",
  };
  $("#engine-facts").replaceChildren(...Object.entries(facts).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const latency = engine.metrics.latency || {};
  const keys = Object.keys(latency).sort(byLatencyShape);
  // a model measured at sequence lengths gets a Sequence column; a CNN's table stays as it was
  const withLength = keys.some((key) => latencyShape(key).length !== null);
  const headRow = $("#engine-latency").tHead.rows[0];
  if (withLength && !headRow.querySelector(".sequence")) headRow.cells[0].after(el("th", { class: "sequence" }, "Sequence"));
  fillRows($("#engine-latency"), keys.map((key) => {
    const s = latency[key], shape = latencyShape(key);
    return el("tr", {}, el("td", {}, String(shape.batch)), ...(withLength ? [el("td", {}, shape.length ?? "—")] : []),
      el("td", {}, fmt.ms(s.p50_ms)), el("td", {}, fmt.ms(s.p90_ms)), el("td", {}, fmt.ms(s.p99_ms)),
      el("td", {}, fmt.int(Math.round(s.throughput_per_s))));
  }));
  const accuracy = engine.metrics.accuracy || {};
  const fidelity = accuracy.fidelity || {};
  const vs = engine.metrics.vs_baseline || {};
  const accuracyFacts = {
    Samples: accuracy.samples, "Top-1": fmt.pct(accuracy.top1), "Top-5": fmt.pct(accuracy.top5),
    "Δ top-1 vs original": fmt.pt(vs.top1_delta), "Agreement with the original": fmt.pct(fidelity.top1_agreement),
    "Cosine with the original": fidelity.cosine_similarity == null ? "—" : fidelity.cosine_similarity.toFixed(5),
    "Non-finite outputs": accuracy.non_finite_outputs ?? "—",
  };
  $("#engine-accuracy").replaceChildren(...Object.entries(accuracyFacts).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v ?? "—")]));
  $("#alias-form").alias.value = engine.alias || "";
  if (metadata) {
    $("#try-form").input.replaceChildren(...metadata.inputs.map((i) => el("option", { value: i.name, "data-datatype": i.datatype },
      `${i.name} ${i.datatype} ${fmt.shape(i.shape.map((d) => (d < 0 ? null : d)))}`)));
  }
  if (engine.precision === "int8") {
    try {
      const errors = await api("GET", `/v1/engines/${seg(id)}/layer-errors`);
      $("#layer-errors-section").hidden = false;
      fillRows($("#layer-errors"), [
        ...errors.activations.map((r) => ["activation", r]), ...errors.weights.map((r) => ["weight", r]),
      ].map(([kind, r]) => el("tr", {}, el("td", {}, el("code", {}, r.tensor ?? r.weight ?? "?")), el("td", {}, kind),
        el("td", {}, r.local_sqnr_db === undefined || r.local_sqnr_db === null ? "—" : r.local_sqnr_db.toFixed(1)),
        el("td", {}, r.model_sqnr_db === undefined || r.model_sqnr_db === null ? (r.sqnr_db?.toFixed(1) ?? "—") : r.model_sqnr_db.toFixed(1)))));
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 404)) reportError(error);
    }
  }
}

function setUpEngineForms() {
  const id = document.body.dataset.engineId;
  const act = async (work, message) => {
    try {
      await work();
      flash(message);
      await enginePage();
    } catch (error) {
      reportError(error);
    }
  };
  $("#alias-form").addEventListener("submit", (event) => {
    event.preventDefault();
    act(() => api("PUT", `/v1/engines/${seg(id)}/alias`, { json: { alias: event.target.alias.value } }), "alias set");
  });
  $("#alias-remove").addEventListener("click", () => act(() => api("DELETE", `/v1/engines/${seg(id)}/alias`), "alias removed"));
  $("#batching-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.target;
    act(() => api("PUT", `/v1/engines/${seg(id)}/batching`, { json: {
      max_batch_size: parseInt(form.max_batch_size.value, 10), max_queue_delay_ms: parseFloat(form.max_queue_delay_ms.value) } }),
    "batching on");
  });
  $("#batching-off").addEventListener("click", () => act(() => api("DELETE", `/v1/engines/${seg(id)}/batching`), "batching off"));
  $("#try-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    try {
      const array = parseNpy(await form.file.files[0].arrayBuffer());
      const result = await inferBinary(id, form.input.value, array);
      $("#try-result").hidden = false;
      $("#try-result").textContent = JSON.stringify(result, null, 1);
    } catch (error) {
      reportError(error);
    }
  });
}

// ------------------------------------------------------------------ .npy in, /v2 binary tensors out

const NPY_DATATYPES = { "<f4": "FP32", "<f8": "FP64", "<f2": "FP16", "|u1": "UINT8", "|i1": "INT8", "<i4": "INT32", "<i8": "INT64", "<i2": "INT16", "|b1": "BOOL" };

// A .npy file: magic, version, a header (a Python dict literal: descr, fortran_order, shape), the data.
function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  const magic = String.fromCharCode(...bytes.slice(1, 6));
  if (bytes[0] !== 0x93 || magic !== "NUMPY") throw new Error("not a .npy file (numpy.save writes one)");
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const offset = major === 1 ? 10 : 12;
  const header = new TextDecoder("latin1").decode(bytes.slice(offset, offset + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*True/.test(header);
  const shape = (/'shape':\s*\(([^)]*)\)/.exec(header)?.[1] || "").split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const datatype = NPY_DATATYPES[descr === "=f4" ? "<f4" : descr];
  if (!datatype) throw new Error(`arrays of dtype '${descr}' are not supported here: save float32, int64, uint8… little-endian`);
  if (fortran) throw new Error("a Fortran-ordered array: save np.ascontiguousarray(x)");
  return { datatype, shape, data: buffer.slice(offset + headerLength) };
}

async function inferBinary(engineId, inputName, array) {
  const header = JSON.stringify({
    inputs: [{ name: inputName, datatype: array.datatype, shape: array.shape, parameters: { binary_data_size: array.data.byteLength } }],
  });
  const headerBytes = new TextEncoder().encode(header);
  const body = new Blob([headerBytes, array.data]);
  const response = await api("POST", `/v2/models/${seg(engineId)}/infer`, {
    body, as: "response",
    headers: { "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": String(headerBytes.length) },
  });
  const result = await response.json();
  for (const output of result.outputs || []) {
    const values = output.data || [];
    if (values.length > 20) output.data = [...values.slice(0, 20), `… ${values.length - 20} more`];
  }
  return result;
}

// ------------------------------------------------------------------ start

const PAGES = {
  overview: [overviewPage, setUpUploads],
  jobs: [jobsPage],
  job: [jobPage, setUpCancel],
  engine: [enginePage, setUpEngineForms],
};

document.addEventListener("DOMContentLoaded", async () => {
  setUpKeyForm();
  const [load, setUp] = PAGES[document.body.dataset.page] || [];
  if (setUp) setUp();
  if (!(await whoAmI())) return;
  if (load) load().catch(reportError);
});
