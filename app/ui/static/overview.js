// optiforge web console: the overview page (models, datasets, the auto-optimize form, a recipe job).
// Uses console.js's helpers (api, el, fmt, lineage…); loaded on every page after it.
"use strict";

// ------------------------------------------------------------------ overview: models, datasets, jobs to start

const ready = (record) => (record.status || "ready") === "ready";

async function overviewPage() {
  const [models, datasets, capabilities] = await Promise.all([
    listAll("/v1/models"), listAll("/v1/datasets"), api("GET", "/v1/capabilities"),
  ]);
  fillRows($("#models"), models.map((m) => el("tr", {},
    el("td", {}, m.name), el("td", {}, el("code", {}, m.id)),
    el("td", {}, el("span", { class: `badge ${m.status === "ready" ? "succeeded" : m.status === "failed" ? "failed" : "running"}`,
      title: m.error ? `${m.error.code}: ${m.error.detail}` : undefined }, m.status || "ready")),
    el("td", {}, m.inputs.map((i) => `${i.name} ${i.dtype} ${fmt.shape(i.shape)}`).join("; ")),
    el("td", {}, fmt.int(m.parameters)), el("td", {}, fmt.mb(m.size_bytes)), el("td", {}, fmt.when(m.created_at)),
    el("td", {}, deleteButton(`model ${m.name}`, `/v1/models/${seg(m.id)}`,
      "Its jobs, engines and reports are deleted with it.", overviewPage)))));
  fillRows($("#datasets"), datasets.map((d) => el("tr", {},
    el("td", {}, d.name), el("td", {}, el("code", {}, d.id)), el("td", {}, fmt.int(d.samples)),
    el("td", {}, d.has_labels ? `${d.classes ?? "?"} classes` : "none"),
    el("td", {}, Object.entries(d.arrays || {}).map(([name, a]) => `${name} ${a.dtype} ${fmt.shape(a.shape)}`).join("; ")),
    el("td", {}, d.image_folder ? `${d.image_folder.images} images, ${imageSpec(d.image_folder.preprocessing)}` : ".npz",
      ready(d) ? "" : el("span", { class: `badge ${d.status === "failed" ? "failed" : "running"}`,
        title: d.error ? `${d.error.code}: ${d.error.detail}` : `decoded by job ${d.processing_job_id}` }, d.status)),
    el("td", {}, fmt.when(d.created_at)),
    el("td", {}, deleteButton(`dataset ${d.name}`, `/v1/datasets/${seg(d.id)}`,
      "Finished jobs that used it keep their results.", overviewPage)))));

  const modelOptions = () => models.filter(ready).map((m) => el("option", { value: m.id }, `${m.name} (${m.id})`));
  const datasetOption = (d) => el("option", { value: d.id, "data-labels": d.has_labels ? "yes" : "no" },
    `${d.name} · ${d.samples} samples${d.has_labels ? ", labelled" : ""} (${d.id})`);
  const usable = datasets.filter(ready);
  // refill a choice, keeping what the person had chosen while it still exists
  const keep = (select, fill) => {
    const value = select.value;
    fill();
    if (value && [...select.options].some((option) => option.value === value)) select.value = value;
  };

  const form = $("#start-job");
  keep(form.model_id, () => form.model_id.replaceChildren(...modelOptions()));
  for (const select of [form.evaluation_dataset_id, form.calibration_dataset_id]) {
    keep(select, () => select.replaceChildren(el("option", { value: "" }, "none"), ...usable.map(datasetOption)));
  }
  keep(form.precision, () => form.precision.replaceChildren(...capabilities.precisions.map((p) => el("option", { value: p }, p))));
  const cpuBackends = capabilities.backends.filter((b) => b.queue === "cpu" || b.available_here);
  if (!form.targets.options.length) {
    form.targets.replaceChildren(...cpuBackends.map((b, index) => el("option", { value: b.name, selected: index === 0 }, b.name)));
  }

  const auto = $("#auto-optimize");
  keep(auto.model_id, () => auto.model_id.replaceChildren(...modelOptions()));
  keep(auto.evaluation_dataset_id, () => {
    auto.evaluation_dataset_id.replaceChildren(...usable.map(datasetOption));
    // a labelled set first: it can score top-1, the budget's default metric
    const labelled = usable.find((d) => d.has_labels);
    if (labelled) auto.evaluation_dataset_id.value = labelled.id;
  });
  keep(auto.calibration_dataset_id, () => auto.calibration_dataset_id.replaceChildren(
    el("option", { value: "" }, "none: no INT8, no pruning"), ...usable.map(datasetOption)));
  if (!auto.backends.options.length) {
    auto.backends.replaceChildren(...capabilities.backends.filter((b) => b.queue === "cpu")
      .map((b) => el("option", { value: b.name, disabled: !b.available_here }, b.available_here ? b.name : `${b.name} (not on this server)`)));
  }
  budgetReading();
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
        flash(made.deduplicated
          ? `the same ${what} is already stored as ${made.name} (${made.id}): reused, nothing uploaded twice`
          : `${what} ${made.name} stored as ${made.id}` + (pending ? `: ${made.status} (job ${made.processing_job_id || made.conversion_job_id})` : ""));
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
  setUpAutoOptimize();
}

// ------------------------------------------------------------------ the auto-optimize form

// What the max drop means, in words, as the person types it: points of top-1 or of fidelity, or a
// percentage of the original's score (relative); and the fraction the API receives.
function budgetReading() {
  const form = $("#auto-optimize");
  if (!form) return;
  const value = parseFloat(form.max_drop.value);
  const relative = form.relative.checked;
  const metric = form.budget_metric.value;
  $("#max-drop-unit").textContent = relative ? "(% of the original's score)" : "(points)";
  const reading = $("#max-drop-reading");
  if (!Number.isFinite(value)) {
    reading.textContent = "";
    return;
  }
  const fraction = value / 100;
  const what = metric === "top1" ? "top-1 accuracy" : "fidelity to the original (cosine similarity; top-1 agreement for class scores)";
  const example = (score) => (relative ? score * (1 - fraction) : score - fraction);
  reading.textContent = relative
    ? `max_drop ${fraction.toPrecision(3)} (relative): the engine may lose at most ${value} % of the original's ${what}, e.g. 90.0 % → ${(100 * example(0.9)).toFixed(1)} %.`
    : `max_drop ${fraction.toPrecision(3)}: the engine may lose at most ${value} point${value === 1 ? "" : "s"} of ${what}, e.g. 90.0 % → ${(100 * example(0.9)).toFixed(1)} %.`;
}

// The label text of a form control, for error messages that name what to fix.
function controlName(control) {
  const label = control.closest("label");
  const text = label ? [...label.childNodes].filter((n) => n.nodeType === Node.TEXT_NODE).map((n) => n.textContent).join(" ") : "";
  return text.trim() || control.getAttribute("aria-label") || control.name;
}

function autoOptimizeBody(form) {
  // the numbers and patterns first (the record choices get their own sentences in the caller)
  const invalid = [...form.elements].find((control) => control.willValidate && control.tagName !== "SELECT" && !control.checkValidity());
  if (invalid) throw Object.assign(new Error(`${controlName(invalid)}: ${invalid.validationMessage}`), { control: invalid });
  const checked = (name) => $$(`input[name=${name}]:checked`, form).map((box) => box.value);
  const defaults = (name) => $$(`input[name=${name}]`, form).filter((box) => box.defaultChecked).map((box) => box.value);
  const same = (a, b) => a.length === b.length && a.every((value) => b.includes(value));
  const integer = (control) => parseInt(control.value, 10);

  const precisions = checked("precisions");
  if (!precisions.length) throw Object.assign(new Error("Precisions: choose at least one"), { control: $("input[name=precisions]", form) });
  const calibrations = checked("calibrations");
  const ratioText = form.prune_ratios.value.trim();
  const ratios = ratioText ? ratioText.split(/[\s,]+/).filter(Boolean).map(Number) : [];
  const maxRatios = parseInt(form.prune_ratios.dataset.maxItems, 10);
  if (ratios.some((r) => !Number.isFinite(r) || r < 0 || r >= 1)) {
    throw Object.assign(new Error("Pruning ratios: fractions of channels removed, at least 0 and below 1 (e.g. 0.3, 0.5)"), { control: form.prune_ratios });
  }
  if (ratios.length > maxRatios) throw Object.assign(new Error(`Pruning ratios: at most ${maxRatios}`), { control: form.prune_ratios });

  const space = {
    prune_ratios: ratios,
    prune_method: form.prune_method.value,
    finetune_epochs: integer(form.finetune_epochs),
    float_fallback: form.float_fallback.checked,
    max_full_evaluations: integer(form.max_full_evaluations),
    qat_epochs: integer(form.qat_epochs),
    sensitivity: form.sensitivity.checked,
    graph_optimization: { model_type: form.graph_optimization.value },
  };
  const backends = [...form.backends.selectedOptions].map((o) => o.value);
  if (backends.length) space.backends = backends;
  // the server's own defaults (and their order) when the boxes are as the form drew them
  if (!same(precisions, defaults("precisions"))) space.precisions = precisions;
  if (!same(calibrations, defaults("calibrations"))) space.calibrations = calibrations;

  const body = {
    evaluation_dataset_id: form.evaluation_dataset_id.value,
    objective: { metric: form.objective_metric.value, batch_size: integer(form.batch_size) },
    accuracy_budget: {
      metric: form.budget_metric.value,
      max_drop: Number((parseFloat(form.max_drop.value) / 100).toPrecision(10)),
      relative: form.relative.checked,
    },
    time_budget_minutes: parseFloat(form.time_budget_minutes.value),
    space,
  };
  if (form.sequence_length.value) body.objective.sequence_length = integer(form.sequence_length);
  if (form.calibration_dataset_id.value) body.calibration_dataset_id = form.calibration_dataset_id.value;
  if (form.alias.value.trim()) body.alias = form.alias.value.trim();
  return body;
}

function setUpAutoOptimize() {
  const form = $("#auto-optimize");
  const error = $("#auto-error");
  const showError = (message, control) => {
    error.textContent = message;
    error.hidden = false;
    control?.focus();
  };
  for (const name of ["max_drop", "relative", "budget_metric"]) form[name].addEventListener("input", budgetReading);
  form.budget_metric.addEventListener("change", budgetReading);
  // top1 needs labels: an unlabelled evaluation set switches the budget to fidelity, as the API does
  form.evaluation_dataset_id.addEventListener("change", () => {
    const option = form.evaluation_dataset_id.selectedOptions[0];
    if (option?.dataset.labels === "no" && form.budget_metric.value === "top1") {
      form.budget_metric.value = "fidelity";
      budgetReading();
      flash("this evaluation set has no labels: the budget is on fidelity to the original");
    }
  });
  form.addEventListener("reset", () => setTimeout(() => { error.hidden = true; budgetReading(); }));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    let body;
    try {
      body = autoOptimizeBody(form);
    } catch (problem) {
      return showError(problem.message, problem.control);
    }
    if (!form.model_id.value) return showError("Model: upload a model first", form.model_id);
    if (!form.evaluation_dataset_id.value) return showError("Evaluation set: upload one first (it scores every candidate)", form.evaluation_dataset_id);
    const button = $("button[type=submit]", form);
    button.disabled = true;
    try {
      const job = await api("POST", `/v1/models/${seg(form.model_id.value)}/optimize`, { json: body });
      location.href = uiPath(`/jobs/${seg(job.id)}`);
    } catch (failure) {
      button.disabled = false;
      if (failure instanceof ApiError && failure.status !== 401) showError(`${failure.code}: ${failure.detail}`);
      else reportError(failure);
    }
  });
}
