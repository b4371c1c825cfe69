/* The trade-off page of one study: front, eps selector, requirement filters, Optuna's figures. */
"use strict";

(() => {
  const { api, drawFigure, el, formatNumber, formatPercent, formatDuration, metricLabel, familyChip, progressBar, showProblem, toast, every, PARAM_LABELS } = liptune;
  const studyId = document.body.dataset.studyId;
  const base = `/studies/${encodeURIComponent(studyId)}`;
  const REFRESH_SECONDS = 5;
  const TRIALS_PAGE_SIZE = 25;

  const state = {
    study: null,
    eps: null, // null: the study's own objectives; a number: the front at that eps, from the radii
    defaultEps: 0.5,
    trialsPage: 1,
    staticFiguresAt: -1, // completed count when importance and parallel coordinates were drawn
  };

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ header

  function renderHead(study) {
    document.title = `${study.name} · liptune`;
    $("study-name").textContent = study.name;
    $("crumb-name").textContent = study.name;
    const status = $("study-status");
    status.textContent = study.status;
    status.className = `badge ${study.status}`;
    const spec = study.spec || {};
    const model = spec.model ? `${spec.model.name}${spec.model.widths ? ` ${JSON.stringify(spec.model.widths)}` : ""}` : study.model;
    const families = spec.search_space ? [].concat(spec.search_space.loss).join(", ") : "";
    const classes = study.class_names ? `classes: ${study.class_names.join(", ")}` : "";
    $("study-meta").textContent = [study.dataset, classes, model, families && `losses: ${families}`, spec.sampler && `sampler: ${spec.sampler}`, spec.training && `${spec.training.epochs} epochs`]
      .filter(Boolean).join(" · ");
    $("study-progress").replaceChildren(progressBar(study.counts || {}, spec.n_trials));
    const stats = [];
    for (const objective of study.objectives || []) {
      const best = (study.best || {})[objective.key];
      stats.push([`best ${metricLabel(objective.key)}`, best ? el("a", { href: `${base}/trials/${best.trial}`, text: formatNumber(best.value) }) : "—"]);
    }
    stats.push(["hypervolume", formatNumber(study.hypervolume)]);
    if (study.status === "running") stats.push(["time left (estimate)", formatDuration(study.eta_seconds)]);
    $("study-stats").replaceChildren(...stats.map(([label, value]) => el("div", {}, el("dt", { text: label }), el("dd", {}, value))));
    $("cancel-study").hidden = study.status !== "running";
  }

  // ------------------------------------------------------------------ trade-off

  function figureUrl(name, params = {}) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(params)) if (value !== null && value !== undefined && value !== "") query.set(key, value);
    const text = query.toString();
    return `${base}/figures/${name}${text ? `?${text}` : ""}`;
  }

  function requirementParams() {
    return { min_certified_accuracy: $("req-certified").value, min_accuracy: $("req-accuracy").value };
  }

  function selectedEps() {
    return state.eps === null ? state.defaultEps : state.eps;
  }

  async function drawTradeoff() {
    const eps = state.eps;
    const figure = await drawFigure("pareto-plot", figureUrl("pareto", { eps, ...requirementParams(), requirement_eps: selectedEps() }));
    const plot = $("pareto-plot");
    plot.dataset.eps = eps === null ? "" : String(eps);
    plot.dataset.drawn = String(Number(plot.dataset.drawn || 0) + 1);
    renderRecommendation((figure.layout && figure.layout.meta) || {});
    $("front-caption").textContent = eps === null
      ? "front of the study's objectives"
      : `front in (accuracy, certified accuracy at eps = ${eps}), recomputed from the stored radii`;
    await Promise.all([
      drawFigure("curves-plot", figureUrl("certified-accuracy", { eps, marker: selectedEps() })),
      renderFrontTable(),
    ]);
  }

  function renderRecommendation(meta) {
    const box = $("recommendation");
    const rec = meta.recommendation;
    if (!rec) {
      box.hidden = true;
      return;
    }
    box.replaceChildren();
    box.hidden = false;
    const asked = Object.entries(rec.minimums).map(([key, min]) => `${metricLabel(key)} ≥ ${min}`).join(" and ");
    if (rec.trial !== null && rec.trial !== undefined) {
      box.className = "recommendation";
      box.append(
        `${meta.meeting.length} trial${meta.meeting.length === 1 ? "" : "s"} meet ${asked}. Recommended: `,
        el("a", { href: `${base}/trials/${rec.trial}`, text: `trial #${rec.trial}` }),
        ` (best ${metricLabel(rec.maximize)} among them).`,
      );
    } else {
      box.className = "recommendation none";
      const reached = Object.entries(rec.best_achieved || {}).map(([key, value]) => `${metricLabel(key)} ${formatNumber(value)}`).join(", ");
      box.append(`No trial meets ${asked}.`, reached ? ` Best reached: ${reached}.` : "");
      if (rec.closest !== null && rec.closest !== undefined) {
        box.append(" Closest: ", el("a", { href: `${base}/trials/${rec.closest}`, text: `trial #${rec.closest}` }), ".");
      }
    }
  }

  function paramCells(params) {
    return Object.keys(PARAM_LABELS).map((name) => el("td", { class: "num", text: name in (params || {}) ? formatNumber(params[name]) : "—" }));
  }

  async function renderFrontTable() {
    const query = state.eps === null ? "" : `?eps=${encodeURIComponent(state.eps)}`;
    const front = await api(`${base}/pareto${query}`);
    const keys = (front.objectives || []).map((o) => (typeof o === "string" ? o : o.key));
    const table = $("front-table");
    table.tHead.replaceChildren(el("tr", {}, el("th", { text: "trial" }), el("th", { text: "loss" }),
      Object.values(PARAM_LABELS).map((label) => el("th", { class: "num", text: label })),
      keys.map((key) => el("th", { class: "num", text: metricLabel(key) }))));
    const rows = (front.trials || []).map((record) => el("tr", {},
      el("td", {}, el("a", { href: `${base}/trials/${record.number}`, text: `#${record.number}` })),
      el("td", {}, familyChip(record.params.loss)),
      paramCells(record.params),
      keys.map((key) => el("td", { class: "num", text: formatNumber((record.values || {})[key]) }))));
    if (!rows.length) rows.push(el("tr", { class: "placeholder" }, el("td", { colspan: 5 + keys.length, text: "No completed trial on the front yet." })));
    table.tBodies[0].replaceChildren(...rows);
    $("front-count").textContent = `(${(front.trials || []).length} trial${(front.trials || []).length === 1 ? "" : "s"})`;
  }

  // ------------------------------------------------------------------ trials table

  async function renderTrials() {
    const page = await api(`${base}/trials?page=${state.trialsPage}&size=${TRIALS_PAGE_SIZE}`);
    const keys = (state.study.objectives || []).map((o) => o.key);
    const table = $("trials-table");
    table.tHead.replaceChildren(el("tr", {}, el("th", { text: "trial" }), el("th", { text: "state" }), el("th", { text: "loss" }),
      Object.values(PARAM_LABELS).map((label) => el("th", { class: "num", text: label })),
      keys.map((key) => el("th", { class: "num", text: metricLabel(key) })),
      el("th", { class: "num", text: "duration" }), el("th", { text: "note" })));
    const rows = (page.items || []).map((record) => el("tr", {},
      el("td", {}, el("a", { href: `${base}/trials/${record.number}`, text: `#${record.number}` })),
      el("td", {}, el("span", { class: `badge ${record.state}`, text: record.state })),
      el("td", {}, record.params && record.params.loss ? familyChip(record.params.loss) : "—"),
      paramCells(record.params),
      keys.map((key) => el("td", { class: "num", text: formatNumber((record.values || {})[key]) })),
      el("td", { class: "num", text: formatDuration(record.duration_s) }),
      record.certificate_violations > 0
        ? el("td", { class: "violation-note", text: `certificates broken by the attack: ${record.certificate_violations}` })
        : el("td", { class: "subtle", text: record.failure_reason || (record.feasible === false ? "misses the requirements" : record.retry_of !== null && record.retry_of !== undefined ? `retry of #${record.retry_of}` : "") })));
    if (!rows.length) rows.push(el("tr", { class: "placeholder" }, el("td", { colspan: 7 + keys.length, text: "No trial yet. Workers pick the study up as soon as one is free." })));
    table.tBodies[0].replaceChildren(...rows);
    $("trials-count").textContent = `(${page.total ?? rows.length})`;
    const pager = $("trials-pager");
    pager.replaceChildren();
    if ((page.pages || 1) > 1) {
      pager.append(
        el("button", { class: "secondary small", disabled: state.trialsPage <= 1, onclick: () => { state.trialsPage -= 1; renderTrials(); }, text: "previous" }),
        `page ${page.page} of ${page.pages}`,
        el("button", { class: "secondary small", disabled: state.trialsPage >= page.pages, onclick: () => { state.trialsPage += 1; renderTrials(); }, text: "next" }),
      );
    }
  }

  // ------------------------------------------------------------------ controls

  function setupControls(study) {
    const spec = study.spec || {};
    const objectiveEps = (study.objectives || []).map((o) => o.eps).filter((e) => e !== null && e !== undefined);
    const requirementEps = (spec.requirements || []).map((r) => r.eps).filter((e) => e !== null && e !== undefined);
    const reportEps = spec.eps || [];
    state.defaultEps = objectiveEps[0] ?? requirementEps[0] ?? reportEps[0] ?? 0.5;
    const largest = Math.max(state.defaultEps, ...objectiveEps, ...requirementEps, ...reportEps);
    const range = $("eps-range");
    const input = $("eps-input");
    range.max = String(Math.max(1, Math.ceil(largest * 2 * 10) / 10));
    range.step = "0.01";
    range.value = String(state.defaultEps);
    input.value = String(state.defaultEps);

    let timer = null;
    const apply = (value) => {
      const eps = Number(value);
      if (!Number.isFinite(eps) || eps < 0) return;
      state.eps = eps;
      clearTimeout(timer);
      timer = setTimeout(() => drawTradeoff().catch(report), 120);
    };
    range.addEventListener("input", () => { input.value = range.value; apply(range.value); });
    input.addEventListener("change", () => { range.value = input.value; apply(input.value); });
    $("eps-reset").addEventListener("click", () => {
      state.eps = null;
      range.value = input.value = String(state.defaultEps);
      drawTradeoff().catch(report);
    });
    for (const id of ["req-certified", "req-accuracy"]) $(id).addEventListener("change", () => drawTradeoff().catch(report));

    const select = $("parallel-objective");
    select.replaceChildren(...(study.objectives || []).map((o) => el("option", { value: o.key, text: metricLabel(o.key) })));
    select.addEventListener("change", () => drawFigure("parallel-plot", figureUrl("parallel-coordinates", { objective: select.value })).catch(report));

    $("cancel-study").addEventListener("click", async () => {
      if (!window.confirm(`Cancel the study "${study.name}"? Running trials stop after their current epoch.`)) return;
      try {
        await api(`${base}/cancel`, { method: "POST" });
        toast("Study cancelled.");
        await refresh();
      } catch (error) {
        toast(`Could not cancel: ${error.message}`, { error: true });
      }
    });
  }

  function report(error) {
    toast(error.message, { error: true });
  }

  // ------------------------------------------------------------------ refresh loop

  const refresh = every(REFRESH_SECONDS, async () => {
    const study = await api(base);
    state.study = study;
    renderHead(study);
    const completed = (study.counts || {}).COMPLETE || 0;
    const jobs = [drawTradeoff(), drawFigure("hypervolume-plot", figureUrl("hypervolume")), renderTrials()];
    if (completed !== state.staticFiguresAt) {
      jobs.push(drawFigure("importance-plot", figureUrl("importance")));
      jobs.push(drawFigure("parallel-plot", figureUrl("parallel-coordinates", { objective: $("parallel-objective").value })));
      state.staticFiguresAt = completed;
    }
    await Promise.all(jobs);
    document.body.dataset.loaded = "true";
    return study.status === "running";
  });

  document.addEventListener("DOMContentLoaded", async () => {
    try {
      const study = await api(base);
      state.study = study;
      setupControls(study);
      await refresh();
    } catch (error) {
      const main = document.querySelector("main");
      const box = el("div", { class: "errors" });
      showProblem(box, error);
      main.prepend(box);
    }
  });
})();
