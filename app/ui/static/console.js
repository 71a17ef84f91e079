// optiforge web console: every figure comes from the public API (/v1, /v2), called with the API
// key the person typed (kept in this tab's sessionStorage, sent as `Authorization: Bearer`).
// No build step, no framework: this file holds what every page uses (the API, DOM helpers, figures,
// lineage, the API key, deleting) and starts the page named by <body data-page>; each page's code
// is in its own file (overview.js, jobs.js, report.js, engine.js, compare.js), the plots in
// plot.js. Fields the API adds later (lineage, best, elapsed_s…) are read when present and their
// places left out or filled from older fields when not.
"use strict";

const KEY_STORAGE = "optiforge-api-key";
const POLL_MS = 2000;
const ACTIVE = new Set(["queued", "running"]);
//: 409 codes a forced delete does not override (a running job must be cancelled first).
const UNFORCEABLE = new Set(["job_active", "model_in_use"]);

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
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

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

function facts(list, entries) {
  list.replaceChildren(...entries.filter(([, v]) => v !== undefined)
    .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v ?? "—")]));
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

const missing = (v) => v === null || v === undefined || (typeof v === "number" && !Number.isFinite(v));
const fmt = {
  ms: (v) => (missing(v) ? "—" : Number(v).toFixed(3)),
  pct: (v) => (missing(v) ? "—" : `${(100 * v).toFixed(2)} %`),
  pt: (v) => (missing(v) ? "—" : `${v >= 0 ? "+" : "−"}${Math.abs(100 * v).toFixed(2)} pt`),
  // a drop (positive: accuracy lost), as a signed change of the score
  drop: (v) => (missing(v) ? "—" : `${v > 0 ? "−" : v < 0 ? "+" : "±"}${Math.abs(100 * v).toFixed(2)} pt`),
  speedup: (v) => (missing(v) ? "—" : `${Number(v).toFixed(2)}×`),
  mb: (bytes) => (missing(bytes) ? "—" : `${(bytes / 1e6).toFixed(2)} MB`),
  int: (v) => (missing(v) ? "—" : Number(v).toLocaleString("en")),
  when: (iso) => (iso ? new Date(iso).toLocaleString() : "—"),
  shape: (dims) => `[${dims.map((d) => (d === null ? "?" : d)).join(", ")}]`,
  seconds: (s) => {
    if (missing(s)) return "—";
    const whole = Math.max(0, Math.round(s));
    if (whole < 60) return `${whole} s`;
    const minutes = Math.floor(whole / 60), rest = whole % 60;
    if (minutes < 60) return `${minutes} min ${String(rest).padStart(2, "0")} s`;
    return `${Math.floor(minutes / 60)} h ${String(minutes % 60).padStart(2, "0")} min`;
  },
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
const KIND_LABELS = { optimize: "recipe", autotune: "auto-optimize" };
const kindLabel = (job) => job.kind_label || KIND_LABELS[job.kind] || job.kind;

// Where an engine (or a candidate, or a report row) came from, in one line: the API's lineage label
// when it has one, else what the older fields say (backend, precision, pruning of build_info).
function lineageText(lineage, fallback = {}) {
  if (lineage?.label) return lineage.label;
  const precision = lineage?.precision ?? fallback.precision;
  const backend = lineage?.backend ?? fallback.backend;
  const parts = [[precision, backend].filter(Boolean).join(" ")];
  const pruning = lineage?.pruning ?? fallback.pruning;
  if (pruning?.ratio) parts.push(`pruned ${Math.round(100 * pruning.ratio)} %${pruning.criterion ? ` (${pruning.criterion})` : ""}`);
  else if (lineage?.prune_ratio) parts.push(`pruned ${Math.round(100 * lineage.prune_ratio)} %`);
  if (lineage?.calibration) parts.push(lineage.calibration);
  const fallbackNodes = lineage?.fallback_nodes;
  if (fallbackNodes) parts.push(`${fallbackNodes} in float`);
  else if (lineage?.float_fallback === true) parts.push("worst layers in float");
  if (lineage?.qat || lineage?.qat_epochs) parts.push("QAT");
  return parts.filter(Boolean).join(" · ") || "—";
}

// What a search result (JobOut.best, a candidate row) is called: its lineage label, else its own.
const resultLabel = (result) => result.lineage?.label || result.label || lineageText(result.lineage);

function engineLineage(engine) {
  const prune = engine.build_info?.prune;
  return lineageText(engine.lineage || engine.build_info?.lineage, {
    backend: engine.backend, precision: engine.precision,
    pruning: prune && (prune.ratio ? { ratio: prune.ratio, criterion: prune.method } : null),
  });
}

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

// ------------------------------------------------------------------ deleting, with a confirmation

// Ask, then DELETE `path`; a 409 shows the server's sentence and, where forcing can help, offers
// "Delete anyway" (`?force=true`). `done` runs after a delete (e.g. reload the list, leave the page).
function confirmDelete(what, path, consequence, done) {
  const dialog = $("#confirm-dialog");
  $("#confirm-title").textContent = `Delete ${what}?`;
  $("#confirm-text").textContent = consequence;
  const refusal = $("#confirm-refusal"), remove = $("#confirm-delete"), force = $("#confirm-force");
  refusal.hidden = true;
  force.hidden = true;
  remove.hidden = false;
  const run = async (forced) => {
    remove.disabled = force.disabled = true;
    try {
      await api("DELETE", forced ? `${path}?force=true` : path);
      dialog.close();
      flash(`${what} deleted`);
      await done();
    } catch (error) {
      if (error instanceof ApiError && error.status === 409) {
        refusal.textContent = error.detail;
        refusal.hidden = false;
        remove.hidden = true;
        force.hidden = forced || UNFORCEABLE.has(error.code);
      } else {
        dialog.close();
        reportError(error);
      }
    } finally {
      remove.disabled = force.disabled = false;
    }
  };
  remove.onclick = () => run(false);
  force.onclick = () => run(true);
  $("#confirm-cancel").onclick = () => dialog.close();
  dialog.showModal();
  remove.focus();
}

function deleteButton(what, path, consequence, done) {
  return el("button", { type: "button", class: "danger-outline small-button", "aria-label": `delete ${what}`,
    onclick: () => confirmDelete(what, path, consequence, done) }, "Delete");
}

// ------------------------------------------------------------------ start

// Each page's loader (fills it from the API) and set-up (wires its forms), defined by the page
// scripts (overview.js, jobs.js, engine.js, compare.js), all loaded before DOMContentLoaded.
const PAGES = () => ({
  overview: [overviewPage, setUpUploads],
  jobs: [jobsPage, setUpJobFilters],
  job: [jobPage, setUpJobActions],
  engine: [enginePage, setUpEngineForms],
  compare: [comparePage],
});

document.addEventListener("DOMContentLoaded", async () => {
  setUpKeyForm();
  const [load, setUp] = PAGES()[document.body.dataset.page] || [];
  if (setUp) setUp();
  if (!(await whoAmI())) return;
  if (load) load().catch(reportError);
});
