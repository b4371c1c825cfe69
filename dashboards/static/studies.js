/* The studies list and the form that submits a new study. */
"use strict";

(() => {
  const { api, el, formatPercent, formatDate, progressBar, showProblem, toast, every } = liptune;
  const $ = (id) => document.getElementById(id);
  const PAGE_SIZE = 20;
  const state = { page: 1, catalog: { datasets: [], models: [], losses: [], training: {} } };

  // ------------------------------------------------------------------ list

  function bestCell(best, prefix) {
    const key = Object.keys(best || {}).find((k) => k === prefix || k.startsWith(`${prefix}_eps_`));
    if (!key) return el("td", { class: "num subtle", text: "—" });
    const eps = key.split("_eps_")[1];
    return el("td", { class: "num", title: `trial #${best[key].trial}` }, formatPercent(best[key].value), eps ? el("span", { class: "subtle", text: ` @ ${eps}` }) : null);
  }

  function studyRow(study) {
    const link = `/studies/${encodeURIComponent(study.id)}`;
    const cancel = study.status === "running"
      ? el("button", { class: "danger secondary small", "data-cancel": study.id, onclick: () => cancelStudy(study), text: "Cancel" })
      : null;
    return el("tr", { "data-study-id": study.id },
      el("td", {}, el("a", { href: link, text: study.name })),
      el("td", { text: study.dataset }),
      el("td", { text: study.model }),
      el("td", {}, el("span", { class: `badge ${study.status}`, text: study.status })),
      el("td", {}, progressBar(study.counts || {}, study.n_trials)),
      bestCell(study.best, "accuracy"),
      bestCell(study.best, "certified_accuracy"),
      el("td", { class: "subtle", text: formatDate(study.created_at) }),
      el("td", {}, cancel));
  }

  async function cancelStudy(study) {
    if (!window.confirm(`Cancel the study "${study.name}"? Running trials stop after their current epoch.`)) return;
    try {
      await api(`/studies/${encodeURIComponent(study.id)}/cancel`, { method: "POST" });
      toast(`Cancelled "${study.name}".`);
      await refresh();
    } catch (error) {
      toast(`Could not cancel: ${error.message}`, { error: true });
    }
  }

  const refresh = every(5, async () => {
    const status = $("status-filter").value;
    const query = new URLSearchParams({ page: state.page, size: PAGE_SIZE });
    if (status) query.set("status", status);
    const page = await api(`/studies?${query}`);
    const rows = page.items.map(studyRow);
    if (!rows.length) {
      const message = status ? `No ${status} study.` : "No study yet: submit one with the form below.";
      rows.push(el("tr", { class: "placeholder" }, el("td", { colspan: 9, text: message })));
    }
    $("studies-body").replaceChildren(...rows);
    const pager = $("studies-pager");
    pager.replaceChildren();
    if (page.pages > 1) {
      pager.append(
        el("button", { class: "secondary small", disabled: state.page <= 1, onclick: () => { state.page -= 1; refresh(); }, text: "previous" }),
        `page ${page.page} of ${page.pages} · ${page.total} studies`,
        el("button", { class: "secondary small", disabled: state.page >= page.pages, onclick: () => { state.page += 1; refresh(); }, text: "next" }),
      );
    }
    document.body.dataset.loaded = "true";
    return page.items.some((study) => study.status === "running");
  });

  // ------------------------------------------------------------------ form

  /** The catalog endpoints may answer a list, {items: [...]} or {name: entry}; a list of entries. */
  function entries(payload) {
    if (Array.isArray(payload)) return payload;
    if (payload && Array.isArray(payload.items)) return payload.items;
    return Object.entries(payload || {}).map(([name, entry]) => Object.assign({ name }, entry));
  }

  function option(entry) {
    const missing = entry.available === false;
    return el("option", {
      value: entry.name,
      title: [entry.description, missing && entry.install_hint].filter(Boolean).join(" "),
      disabled: missing,
      text: missing ? `${entry.name} (not on this server)` : entry.name,
    });
  }

  /** {field: default} of a catalog's field descriptions, leaving out the null defaults. */
  function defaultsOf(fields) {
    const defaults = {};
    for (const [name, info] of Object.entries(fields || {})) if (info.default !== undefined && info.default !== null) defaults[name] = info.default;
    return defaults;
  }

  function findEntry(list, name) {
    return list.find((entry) => entry.name === name) || {};
  }

  /** The spec of the quick fields' current values, on top of `spec` (the JSON the user edits). */
  function applyFields(spec) {
    const { datasets, models, losses } = state.catalog;
    const datasetName = $("f-dataset").value;
    const modelName = $("f-model").value;
    const families = [...document.querySelectorAll("#f-families input:checked")].map((input) => input.value);
    const eps = Number($("f-eps").value);
    spec.name = $("f-name").value.trim();
    if (!spec.dataset || spec.dataset.name !== datasetName) spec.dataset = { name: datasetName };
    if (!spec.model || spec.model.name !== modelName) spec.model = Object.assign({ name: modelName }, defaultsOf(findEntry(models, modelName).fields));
    spec.training = Object.assign(defaultsOf(state.catalog.training), spec.training, { epochs: Number($("f-epochs").value) });
    spec.n_trials = Number($("f-n-trials").value);
    // Each family's parameters: what the editor already says, else the catalog's search range.
    const space = { loss: families };
    for (const family of families) {
      for (const [name, info] of Object.entries(findEntry(losses, family).params || {})) {
        const previous = spec.search_space && spec.search_space[name];
        if (previous !== undefined) space[name] = previous;
        else if (info.low !== undefined && info.high !== undefined) space[name] = { low: info.low, high: info.high, log: Boolean(info.log) };
      }
    }
    spec.search_space = space;
    if (Number.isFinite(eps) && eps > 0) {
      const objectives = (spec.objectives || []).filter((o) => o.metric !== "certified_accuracy");
      if (!objectives.some((o) => o.metric === "accuracy")) objectives.unshift({ metric: "accuracy" });
      objectives.splice(1, 0, { metric: "certified_accuracy", eps });
      spec.objectives = objectives;
    }
    return ordered(spec);
  }

  const KEY_ORDER = ["name", "dataset", "model", "training", "search_space", "objectives", "requirements", "n_trials", "sampler", "pruner", "seed"];

  /** The spec with its keys in reading order (the rest after, as they were). */
  function ordered(spec) {
    const result = {};
    for (const key of KEY_ORDER) if (key in spec) result[key] = spec[key];
    return Object.assign(result, spec);
  }

  function writeSpec(spec) {
    $("spec-json").value = JSON.stringify(spec, null, 2);
    checkJson();
  }

  /** Parses the editor's JSON; marks it invalid (with the parser's message) when it is not. */
  function checkJson() {
    const editor = $("spec-json");
    const status = $("spec-status");
    try {
      const spec = JSON.parse(editor.value);
      editor.classList.remove("invalid");
      status.classList.remove("invalid");
      status.textContent = "Valid JSON; the API checks the rest when you submit.";
      return spec;
    } catch (error) {
      editor.classList.add("invalid");
      status.classList.add("invalid");
      status.textContent = `Not valid JSON: ${error.message}`;
      return null;
    }
  }

  function syncFromFields() {
    const spec = checkJson();
    if (spec === null) return; // never overwrite what the user is fixing
    writeSpec(applyFields(spec));
  }

  function syncToFields(spec) {
    if (typeof spec.name === "string") $("f-name").value = spec.name;
    if (spec.dataset && spec.dataset.name) $("f-dataset").value = spec.dataset.name;
    if (spec.model && spec.model.name) $("f-model").value = spec.model.name;
    if (spec.n_trials) $("f-n-trials").value = spec.n_trials;
    if (spec.training && spec.training.epochs) $("f-epochs").value = spec.training.epochs;
    const certified = (spec.objectives || []).find((o) => o.metric === "certified_accuracy");
    if (certified) $("f-eps").value = certified.eps;
    const families = spec.search_space ? [].concat(spec.search_space.loss || []) : [];
    for (const input of document.querySelectorAll("#f-families input")) input.checked = families.includes(input.value);
  }

  function defaultSpec() {
    const { datasets, models, losses } = state.catalog;
    const dataset = datasets.find((d) => d.name === "digits") || datasets[0] || { name: "digits" };
    const model = models.find((m) => m.name === "mlp") || models[0] || { name: "mlp" };
    const families = losses.some((l) => l.name === "hkr") ? ["hkr"] : losses.slice(0, 1).map((l) => l.name);
    $("f-name").value = `${dataset.name}-tradeoff`;
    $("f-dataset").value = dataset.name;
    $("f-model").value = model.name;
    for (const input of document.querySelectorAll("#f-families input")) input.checked = families.includes(input.value);
    // The API's defaults, what benchmarks/study_efficiency.py found fastest to a good front on
    // both of its tasks: the guidelines' ladders first, every trial trained to the end.
    return applyFields({
      objectives: [{ metric: "accuracy" }],
      sampler: "guided",
      pruner: { name: "none" },
    });
  }

  async function loadCatalog() {
    const [datasets, models, losses] = await Promise.all([api("/datasets"), api("/models"), api("/losses")]);
    state.catalog = { datasets: entries(datasets), models: entries(models), losses: entries(losses), training: models.training || {} };
    $("f-dataset").replaceChildren(...state.catalog.datasets.map(option));
    $("f-model").replaceChildren(...state.catalog.models.map(option));
    $("f-families").replaceChildren(...state.catalog.losses.map((loss) =>
      el("label", { title: loss.description || "" }, el("input", { type: "checkbox", value: loss.name, name: "loss" }), loss.name)));
    writeSpec(defaultSpec());
  }

  async function submit(event) {
    event.preventDefault();
    const errors = $("form-errors");
    errors.hidden = true;
    const spec = checkJson();
    if (spec === null) {
      showProblem(errors, new Error("The spec is not valid JSON; see the message under the editor."));
      return;
    }
    const button = $("submit-study");
    button.disabled = true;
    try {
      const created = await api("/studies", { method: "POST", body: $("spec-json").value });
      toast(`Study "${created.name || spec.name}" submitted.`);
      state.page = 1;
      $("status-filter").value = "";
      await refresh();
    } catch (error) {
      showProblem(errors, error);
    } finally {
      button.disabled = false;
    }
  }

  document.addEventListener("DOMContentLoaded", async () => {
    $("status-filter").addEventListener("change", () => { state.page = 1; refresh(); });
    $("study-form").addEventListener("submit", submit);
    $("study-form").addEventListener("change", (event) => {
      if (event.target.id !== "spec-json") syncFromFields();
    });
    $("f-name").addEventListener("input", syncFromFields);
    $("spec-json").addEventListener("input", () => {
      const spec = checkJson();
      if (spec !== null) syncToFields(spec);
    });
    $("reset-spec").addEventListener("click", () => writeSpec(defaultSpec()));
    await Promise.all([
      refresh().catch((error) => toast(`Could not list the studies: ${error.message}`, { error: true })),
      loadCatalog().catch((error) => toast(`Could not load the defaults: ${error.message}`, { error: true })),
    ]);
  });
})();
