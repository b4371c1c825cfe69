/* One trial: hyper-parameters, metrics, training curves, certificate radii, MLflow, register. */
"use strict";

(() => {
  const { api, drawFigure, el, formatNumber, formatDuration, formatDate, metricLabel, showProblem, toast, every, PARAM_LABELS } = liptune;
  const { studyId, trialNumber, mlflowUi } = document.body.dataset;
  const base = `/studies/${encodeURIComponent(studyId)}`;
  const trialBase = `${base}/trials/${encodeURIComponent(trialNumber)}`;
  const $ = (id) => document.getElementById(id);
  const ACTIVE_STATES = ["RUNNING", "WAITING"];

  function kvRows(entries) {
    if (!entries.length) return [el("tr", {}, el("td", { class: "subtle", text: "none" }))];
    return entries.map(([key, value]) => el("tr", {}, el("th", { text: key }), el("td", { text: value })));
  }

  function mlflowLink(runId) {
    if (!runId) return "—";
    if (!mlflowUi) return el("span", { title: "No MLflow UI is configured; this is the run id", text: runId });
    const url = `${mlflowUi.replace(/\/$/, "")}/#/runs/${encodeURIComponent(runId)}`;
    return el("a", { href: url, target: "_blank", rel: "noopener", text: runId });
  }

  function render(trial, study) {
    const stateBadge = $("trial-state");
    stateBadge.textContent = trial.state;
    stateBadge.className = `badge ${trial.state}`;
    const family = $("trial-family");
    family.textContent = trial.params.loss || "";
    family.style.setProperty("--chip", liptune.FAMILY_COLORS[trial.params.loss] || "#6B7280");
    if (study) {
      $("crumb-study").textContent = study.name;
      document.title = `trial #${trial.number} · ${study.name} · liptune`;
    }
    $("trial-meta").textContent = [
      trial.started_at && `started ${formatDate(trial.started_at)}`,
      trial.duration_s !== null && trial.duration_s !== undefined && `took ${formatDuration(trial.duration_s)}`,
      trial.retry_of !== null && trial.retry_of !== undefined && `retry of trial #${trial.retry_of}`,
      trial.feasible === false && "does not meet the study's requirements",
    ].filter(Boolean).join(" · ");
    const failure = $("trial-failure");
    failure.hidden = !trial.failure_reason;
    failure.textContent = trial.failure_reason ? `Failed: ${trial.failure_reason}` : "";
    const violations = $("certificate-violations");
    violations.hidden = !(trial.certificate_violations > 0);
    violations.textContent = trial.certificate_violations > 0
      ? `Certificate violation: the attack found adversarial examples closer than the certified radius for ${trial.certificate_violations} of ${trial.attack.points} test points. These certificates do not hold.`
      : "";
    const attack = trial.attack;
    $("attack-table").tBodies[0].replaceChildren(...kvRows(attack ? [
      ["points attacked", String(attack.points)],
      ["violations", String(attack.violations)],
      ["tightness median", formatNumber(attack.tightness_median, 4)],
      ["tightness p10", formatNumber(attack.tightness_p10, 4)],
      ["tightness p90", formatNumber(attack.tightness_p90, 4)],
    ] : []));

    const params = [["loss family", trial.params.loss || "—"]];
    for (const [name, label] of Object.entries(PARAM_LABELS)) if (name in trial.params) params.push([label, formatNumber(trial.params[name], 5)]);
    $("params-table").tBodies[0].replaceChildren(...kvRows(params));
    const metrics = Object.entries(trial.metrics || {}).map(([key, value]) => [metricLabel(key), formatNumber(value, 4)]);
    $("metrics-table").tBodies[0].replaceChildren(...kvRows(metrics));

    $("mlflow-run").replaceChildren(mlflowLink(trial.mlflow_run_id));
    $("model-uri").textContent = trial.model_uri || "—";
    const hasModel = trial.state === "COMPLETE" && Boolean(trial.model_uri && trial.mlflow_run_id);
    for (const id of ["download-onnx", "download-pt"]) {
      const link = $(id);
      link.classList.toggle("disabled", !hasModel);
      if (!hasModel) link.removeAttribute("href");
    }
    $("register-button").disabled = !hasModel;
    if (!hasModel) $("register-button").title = "Only a completed trial with a logged model can be registered";
  }

  /** Downloads go through fetch() when an API key is set, so that the key is sent with them. */
  async function download(event) {
    const link = event.currentTarget;
    if (!liptune.apiKey() || !link.getAttribute("href")) return;
    event.preventDefault();
    try {
      const response = await fetch(link.href, { headers: { "X-API-Key": liptune.apiKey() } });
      if (!response.ok) throw new Error(`download failed (HTTP ${response.status})`);
      const disposition = response.headers.get("content-disposition") || "";
      const match = /filename="?([^";]+)"?/.exec(disposition);
      const url = URL.createObjectURL(await response.blob());
      const anchor = el("a", { href: url, download: match ? match[1] : "model" });
      document.body.append(anchor);
      anchor.click();
      anchor.remove();
      URL.revokeObjectURL(url);
    } catch (error) {
      toast(error.message, { error: true });
    }
  }

  async function register(event) {
    event.preventDefault();
    const errors = $("register-errors");
    const result = $("register-result");
    errors.hidden = true;
    result.hidden = true;
    const aliases = $("register-aliases").value.split(",").map((a) => a.trim()).filter(Boolean);
    try {
      const answer = await api(`${trialBase}/register`, { method: "POST", body: { name: $("register-name").value.trim(), aliases } });
      result.textContent = `Registered. Load it with mlflow.pytorch.load_model("${answer.model_uri}")`;
      result.hidden = false;
    } catch (error) {
      showProblem(errors, error);
    }
  }

  const refresh = every(5, async () => {
    const [trial, study] = await Promise.all([api(trialBase), api(base)]);
    render(trial, study);
    await Promise.all([
      drawFigure("training-plot", `${trialBase}/figures/training-curves`),
      drawFigure("radii-plot", `${trialBase}/figures/radii`),
      drawFigure("attack-plot", `${trialBase}/figures/attack`),
    ]);
    document.body.dataset.loaded = "true";
    return ACTIVE_STATES.includes(trial.state);
  });

  document.addEventListener("DOMContentLoaded", async () => {
    $("register-form").addEventListener("submit", register);
    for (const id of ["download-onnx", "download-pt"]) $(id).addEventListener("click", download);
    try {
      await refresh();
    } catch (error) {
      const box = el("div", { class: "errors" });
      showProblem(box, error);
      document.querySelector("main").prepend(box);
    }
  });
})();
