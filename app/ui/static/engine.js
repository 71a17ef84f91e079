// optiforge web console: an engine's page (facts, download, try it, the per-layer report and "keep in float").
// Uses console.js's helpers (api, el, fmt, lineage…); loaded on every page after it.
"use strict";

// ------------------------------------------------------------------ an engine

async function enginePage() {
  const id = document.body.dataset.engineId;
  const [engine, metadata] = await Promise.all([
    api("GET", `/v1/engines/${seg(id)}`), api("GET", `/v2/models/${seg(id)}`).catch(() => null),
  ]);
  enginePage.engine = engine;
  const model = await api("GET", `/v1/models/${seg(engine.model_id)}`).catch(() => null);
  $("#engine-lineage").textContent = engineLineage(engine);
  facts($("#engine-facts"), [
    ["Backend", engine.backend], ["Precision", engine.precision], ["Lineage", engineLineage(engine)],
    ["Job", link(uiPath(`/jobs/${seg(engine.job_id)}`), engine.job_id)],
    ["Model", model ? [model.name, " ", el("code", {}, engine.model_id)] : el("code", {}, engine.model_id)],
    ["Alias", engine.alias || "—"], ["Size", fmt.mb(engine.size_bytes)],
    ["Build time", missing(engine.build_seconds) ? "—" : `${engine.build_seconds.toFixed(1)} s`],
    ["Batching", engine.batching ? `max ${engine.batching.max_batch_size}, ${engine.batching.max_queue_delay_ms} ms` : "off"],
    ["Largest request", engine.max_batch ? `${engine.max_batch} samples (more: 413 batch_too_large)` : "—"],
    ["Hardware", [engine.hardware.cpu_model, engine.hardware.gpu_model].filter(Boolean).join(" · ") || "—"],
  ]);
  const latency = engine.metrics.latency || {};
  const speedups = engine.metrics.vs_baseline?.speedup || {};
  const keys = Object.keys(latency).sort(byLatencyShape);
  // a model measured at sequence lengths gets a Sequence column; a CNN's table stays as it was
  const withLength = keys.some((key) => latencyShape(key).length !== null);
  const headRow = $("#engine-latency").tHead.rows[0];
  if (withLength && !headRow.querySelector(".sequence")) headRow.cells[0].after(el("th", { class: "sequence" }, "Sequence"));
  fillRows($("#engine-latency"), keys.map((key) => {
    const s = latency[key], shape = latencyShape(key);
    return el("tr", {}, el("td", {}, String(shape.batch)), ...(withLength ? [el("td", {}, shape.length ?? "—")] : []),
      el("td", {}, fmt.ms(s.p50_ms)), el("td", {}, fmt.ms(s.p90_ms)), el("td", {}, fmt.ms(s.p99_ms)),
      el("td", {}, fmt.int(Math.round(s.throughput_per_s))), el("td", {}, fmt.speedup(speedups[key])));
  }));
  const accuracy = engine.metrics.accuracy || {};
  const fidelity = accuracy.fidelity || {};
  const vs = engine.metrics.vs_baseline || {};
  facts($("#engine-accuracy"), [
    ["Samples", accuracy.samples], ["Top-1", fmt.pct(accuracy.top1)], ["Top-5", fmt.pct(accuracy.top5)],
    ["Δ top-1 vs original", fmt.pt(vs.top1_delta)], ["Agreement with the original", fmt.pct(fidelity.top1_agreement)],
    ["Cosine with the original", missing(fidelity.cosine_similarity) ? "—" : fidelity.cosine_similarity.toFixed(5)],
    ["Non-finite outputs", accuracy.non_finite_outputs ?? "—"],
  ]);
  $("#alias-form").alias.value = engine.alias || "";
  const others = (await listAll(`/v1/engines?model_id=${encodeURIComponent(engine.model_id)}`).catch(() => []))
    .filter((other) => other.id !== engine.id);
  const pick = $("#compare-form").other;
  pick.replaceChildren(...others.map((other) => el("option", { value: other.id }, `${engineLineage(other)} (${other.id})`)));
  $("#compare-form").hidden = others.length === 0;
  if (metadata) {
    $("#try-form").input.replaceChildren(...metadata.inputs.map((i) => el("option", { value: i.name, "data-datatype": i.datatype },
      `${i.name} ${i.datatype} ${fmt.shape(i.shape.map((d) => (d < 0 ? null : d)))}`)));
  }
  if (engine.precision === "int8" && !enginePage.layersShown) {
    try {
      renderLayerErrors(await api("GET", `/v1/engines/${seg(id)}/layer-errors`));
      enginePage.layersShown = true;
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 404)) reportError(error);
    }
  }
}

//: Used where the API sends no legend of its own (a server before the per-layer view).
const LAYER_LEGEND = {
  "Own error": "the error this node adds on its own (only its quantizer, its inputs in float); the table is sorted by it, worst first",
  "Own SQNR dB": "signal-to-quantization-noise of this tensor's own Q/DQ pair (dB, higher is better)",
  "Model SQNR dB": "the INT8 model's tensor against the float model's: the error accumulated up to here (dB, higher is better)",
  "—": "not measured for this row: a Relu or Clip folded into the op before it has no Q/DQ of its own, or the value was not finite",
};
//: The API's legend keys (its field names) as this table's headings.
const LAYER_HEADINGS = {
  node: "Node", op_type: "Op", own_error: "Own error", accumulated_error: "Accumulated error",
  own_sqnr_db: "Own SQNR dB", model_sqnr_db: "Model SQNR dB", tensor: "Tensor",
};
const sqnr = (v) => (missing(v) ? "—" : Number(v).toFixed(1));
const ownError = (row) => row.own_error ?? null;
// a relative RMS error (0.01 = 1 %), as a percentage with three significant digits
const relative = (v) => (missing(v) ? "—" : v < 1e-6 ? "≈ 0 %" : `${Number((100 * v).toPrecision(3))} %`);

// The per-layer report: one row per quantized node (its name as in the uploaded model), sorted by the
// error it adds on its own, worst first; a legend (the API's, or this one); boxes to keep nodes in float.
function renderLayerErrors(errors) {
  $("#layer-errors-section").hidden = false;
  // the API's legend where it has one (its words for its columns), and what "—" means in any case
  const legend = errors.legend && Object.keys(errors.legend).length
    ? Object.fromEntries(Object.entries(errors.legend).map(([key, text]) => [LAYER_HEADINGS[key] || key, text]))
    : { ...LAYER_LEGEND };
  if (!("—" in legend)) legend["—"] = LAYER_LEGEND["—"];
  facts($("#layer-legend"), Object.entries(legend));
  const rows = [...(errors.activations || [])];
  const hasOwn = rows.some((row) => !missing(ownError(row)));
  // worst first: by own error (descending) where the API gives it, else by the lowest local SQNR
  // (the error a node's own Q/DQ adds); rows with neither last
  const score = (row) => (hasOwn ? -(ownError(row) ?? -Infinity) : row.own_sqnr_db ?? row.local_sqnr_db ?? Infinity);
  rows.sort((a, b) => score(a) - score(b));
  const update = (event) => {
    // a folded Relu's row and its Conv's row name one node to keep: their boxes move together
    const box = event?.target;
    if (box) for (const twin of $$("#layer-errors input.keep")) if (twin.value === box.value) twin.checked = box.checked;
    const count = selectedLayers().length;
    $("#keep-float").disabled = count === 0;
    $("#keep-float-help").textContent = count ? `${count} node${count === 1 ? "" : "s"} selected` : "select the layers to exclude from INT8";
  };
  fillRows($("#layer-errors"), rows.map((row) => {
    // the node whose quantizer the row measures (a graph input has none: nothing to keep in float)
    const node = "quantized_node" in row ? row.quantized_node || "" : row.node || "";
    return el("tr", {},
      el("td", {}, node ? el("input", { type: "checkbox", class: "keep", value: node, "aria-label": `keep ${node} in float`, onchange: update }) : ""),
      el("td", {}, el("code", {}, row.node || "—"), row.quantized_node && row.quantized_node !== row.node
        ? el("div", { class: "muted small" }, `quantized with ${row.quantized_node}`) : ""),
      el("td", {}, row.op_type || "—"),
      el("td", {}, relative(ownError(row))), el("td", {}, relative(row.accumulated_error)),
      el("td", {}, sqnr(row.own_sqnr_db ?? row.local_sqnr_db)), el("td", {}, sqnr(row.model_sqnr_db ?? row.sqnr_db)),
      el("td", { class: "muted" }, el("code", {}, row.tensor ?? "—")));
  }));
  const weights = errors.weights || [];
  $("#layer-weights-note").textContent = weights.length
    ? `Weights: the worst is the weight of ${weights[0].node || (weights[0].nodes || []).join(", ") || "—"} (${weights[0].weight}, `
      + `own error ${relative(ownError(weights[0]))}, ${sqnr(weights[0].sqnr_db)} dB).`
    : "";
  update();
}

const selectedLayers = () => [...new Set($$("#layer-errors input.keep:checked").map((box) => box.value))];

// "Keep these in float": the job that built this engine, again, with the selected nodes left out of
// INT8 (`quantize.nodes_to_exclude`); its accuracy budget, datasets and targets kept.
async function keepInFloat() {
  const engine = enginePage.engine;
  const nodes = selectedLayers();
  const source = await api("GET", `/v1/jobs/${seg(engine.job_id)}`);
  const measured = Object.keys(engine.metrics.latency || {}).map((key) => latencyShape(key).batch);
  const lineage = engine.lineage || engine.build_info?.lineage || {};
  const recipe = source.kind === "optimize" ? structuredClone(source.recipe) : {
    targets: [engine.backend], precision: "int8", batch_sizes: [...new Set(measured)].sort((a, b) => a - b),
    quantize: { calibration: lineage.calibration || "minmax" },
  };
  if (source.kind !== "optimize" && source.recipe?.budget) {
    const budget = source.recipe.budget;
    if (!budget.relative) recipe.accuracy_budget = { metric: budget.metric, max_drop: budget.max_drop };
  }
  // a pruned candidate of a search: pruned again the same way (with its recovery training)
  if (source.kind !== "optimize" && lineage.pruning?.ratio) {
    recipe.prune = { method: lineage.pruning.criterion || "l1", ratio: lineage.pruning.ratio };
    const epochs = source.recipe?.space?.finetune_epochs;
    if (epochs) recipe.finetune = { epochs };
  }
  recipe.precision = "int8";
  recipe.quantize = { ...(recipe.quantize || {}), nodes_to_exclude: [...new Set([...(recipe.quantize?.nodes_to_exclude || []), ...nodes])] };
  const body = { model_id: engine.model_id, recipe };
  if (source.evaluation_dataset_id) body.evaluation_dataset_id = source.evaluation_dataset_id;
  if (source.calibration_dataset_id) body.calibration_dataset_id = source.calibration_dataset_id;
  const job = await api("POST", "/v1/jobs", { json: body });
  location.href = uiPath(`/jobs/${seg(job.id)}`);
}

// The engine's file through fetch (so the API key goes with it), saved under the server's name.
async function download(path, fallbackName) {
  const response = await api("GET", path, { as: "response" });
  const disposition = response.headers.get("Content-Disposition") || "";
  const name = /filename\*=UTF-8''([^;]+)/i.exec(disposition)?.[1] || /filename="?([^";]+)"?/i.exec(disposition)?.[1] || fallbackName;
  const url = URL.createObjectURL(await response.blob());
  const anchor = el("a", { href: url, download: decodeURIComponent(name) });
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
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
  $("#engine-download").addEventListener("click", (event) => {
    event.preventDefault();
    download(`/v1/engines/${seg(id)}/download`, `${id}.bin`).catch(reportError);
  });
  $("#engine-delete").addEventListener("click", () => confirmDelete(`engine ${id}`, `/v1/engines/${seg(id)}`,
    "Its files go; the job's report loses its row.",
    () => { location.href = enginePage.engine ? uiPath(`/jobs/${seg(enginePage.engine.job_id)}`) : uiPath("/jobs"); }));
  $("#compare-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const other = event.target.other.value;
    if (other) location.href = uiPath(`/compare?engines=${encodeURIComponent(id)},${encodeURIComponent(other)}`);
  });
  $("#keep-float").addEventListener("click", async () => {
    $("#keep-float").disabled = true;
    try {
      await keepInFloat();
    } catch (error) {
      $("#keep-float").disabled = false;
      reportError(error);
    }
  });
  $("#try-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    clearTryIt();
    try {
      const array = parseNpy(await form.file.files[0].arrayBuffer());
      const result = await inferBinary(id, form.input.value, array);
      showTryIt(result);
    } catch (error) {
      clearTryIt();
      const error_box = $("#try-error");
      error_box.textContent = error instanceof ApiError ? `${error.code}: ${error.detail}` : error.message || String(error);
      error_box.hidden = false;
    }
  });
}

function clearTryIt() {
  $("#try-error").hidden = true;
  $("#try-error").textContent = "";
  $("#try-top").hidden = true;
  $("#try-top").replaceChildren();
  $("#try-raw-box").hidden = true;
  $("#try-result").textContent = "";
}

// Class scores: an output of shape [batch, classes] (2 to 100 000 classes) of floats.
function classScores(output) {
  const shape = output.shape || [];
  return shape.length === 2 && shape[1] >= 2 && shape[1] <= 100_000 && String(output.datatype).startsWith("FP")
    && Array.isArray(output.data) && output.data.length === shape[0] * shape[1];
}

const softmax = (values) => {
  const top = Math.max(...values);
  const exps = values.map((v) => Math.exp(v - top));
  const sum = exps.reduce((a, b) => a + b, 0);
  return exps.map((v) => v / sum);
};

// The top 5 classes of each sample for class-score outputs, with the score and its softmax share
// (the raw score is what the model gave; the share, what it reads as when the scores are logits).
function showTryIt(result) {
  const tables = [];
  for (const output of result.outputs || []) {
    if (!classScores(output)) continue;
    const [batch, classes] = output.shape;
    for (let sample = 0; sample < Math.min(batch, 8); sample++) {
      const scores = output.data.slice(sample * classes, (sample + 1) * classes);
      const shares = softmax(scores);
      const top = scores.map((score, index) => ({ index, score, share: shares[index] }))
        .sort((a, b) => b.score - a.score).slice(0, 5);
      tables.push(el("div", { class: "top-k" },
        el("h3", {}, `${output.name}, sample ${sample}: top ${top.length} of ${classes} classes`),
        el("table", { class: "top5" }, el("thead", {}, el("tr", {}, ["Class", "Score", "Softmax"].map((h) => el("th", {}, h)))),
          el("tbody", {}, top.map((t) => el("tr", {}, el("td", {}, String(t.index)), el("td", {}, t.score.toFixed(4)), el("td", {}, fmt.pct(t.share))))))));
    }
    if (batch > 8) tables.push(el("p", { class: "muted" }, `… and ${batch - 8} more samples (the raw response has them all)`));
  }
  $("#try-top").replaceChildren(...tables);
  $("#try-top").hidden = tables.length === 0;
  const shown = structuredClone(result);
  for (const output of shown.outputs || []) {
    const values = output.data || [];
    if (values.length > 20) output.data = [...values.slice(0, 20), `… ${values.length - 20} more`];
  }
  $("#try-result").textContent = JSON.stringify(shown, null, 1);
  $("#try-raw-box").hidden = false;
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
  return response.json();
}
