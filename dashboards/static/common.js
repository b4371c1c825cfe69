/* Shared helpers of the liptune pages: the JSON API, the API key, formatting, small widgets. */
"use strict";

const liptune = (() => {
  const KEY_STORAGE = "liptune.apiKey";

  /** An API error carrying the problem+json body ({detail, errors, ...}) when there is one. */
  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
      this.status = status;
      this.problem = problem || {};
    }
  }

  function apiKey() {
    return window.localStorage.getItem(KEY_STORAGE) || "";
  }

  /** fetch() a JSON endpoint of the API; rejects with ApiError on a non-2xx answer. */
  async function api(path, { method = "GET", body } = {}) {
    const headers = { Accept: "application/json" };
    const key = apiKey();
    if (key) headers["X-API-Key"] = key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body),
    });
    const type = response.headers.get("content-type") || "";
    const payload = type.includes("json") ? await response.json() : await response.text();
    if (!response.ok) throw new ApiError(response.status, typeof payload === "object" ? payload : { detail: payload });
    return payload;
  }

  /** Draw a figure endpoint's Plotly JSON into the element with id `elementId`. */
  async function drawFigure(elementId, url) {
    const figure = await api(url);
    const element = document.getElementById(elementId);
    // The same figure URL keeps the user's zoom across refreshes; another one (a new eps) resets it.
    const layout = Object.assign({}, figure.layout, { autosize: true, uirevision: url });
    delete layout.width;
    delete layout.height;
    await Plotly.react(element, figure.data || [], layout, {
      responsive: true,
      displaylogo: false,
      modeBarButtonsToRemove: ["lasso2d", "select2d"],
    });
    return figure;
  }

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function formatNumber(value, digits = 3) {
    if (value === null || value === undefined || value === "") return "—";
    if (value === "Infinity" || value === Infinity) return "∞";
    if (value === "-Infinity" || value === -Infinity) return "-∞";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value) && Math.abs(value) < 1e6) return String(value);
    const abs = Math.abs(value);
    if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(2);
    return String(Number(value.toPrecision(digits + 1)));
  }

  function formatPercent(value) {
    if (value === null || value === undefined) return "—";
    return `${(100 * value).toFixed(1)} %`;
  }

  function formatDuration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 90) return `${Math.round(seconds)} s`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }

  function formatDate(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? iso : date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  }

  /** "certified_accuracy_eps_0.3" -> "certified accuracy @ 0.3". */
  function metricLabel(key) {
    const [name, eps] = key.split("_eps_");
    const label = name.replaceAll("_", " ");
    return eps ? `${label} @ ${eps}` : label;
  }

  const PARAM_LABELS = { margin: "margin", alpha_kr: "alpha_KR", temperature: "temperature" };
  const FAMILY_COLORS = {
    hkr: "#0072B2", soft_hkr: "#CC79A7", tau_ce: "#E69F00", offset_ce: "#B8A000", hinge: "#009E73", kr: "#D55E00", cosine: "#56B4E9",
  };

  function familyChip(family) {
    const chip = el("span", { class: "family-chip", text: family || "—" });
    chip.style.setProperty("--chip", FAMILY_COLORS[family] || "#6B7280");
    return chip;
  }

  /** Stacked bar: completed / running / failed out of the budget. */
  function progressBar(counts, budget) {
    const completed = counts.COMPLETE || 0;
    const running = counts.RUNNING || 0;
    const failed = counts.FAIL || 0;
    const total = Math.max(budget || 0, completed + running + failed, 1);
    const bar = el("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": budget || 0, "aria-valuenow": completed });
    const segment = (cls, n) => {
      if (!n) return;
      const span = el("span", { class: cls, title: `${n} ${cls}` });
      span.style.width = `${(100 * n) / total}%`;
      bar.append(span);
    };
    segment("done", completed);
    segment("running", running);
    segment("failed", failed);
    const parts = [`${completed} / ${budget ?? "?"} completed`];
    if (running) parts.push(`${running} running`);
    if (failed) parts.push(`${failed} failed`);
    return el("div", { class: "progress-wrap" }, bar, el("div", { class: "progress-label", text: parts.join(" · ") }));
  }

  /** The problem+json of a rejected request as a list: detail first, then each named field. */
  function showProblem(container, error) {
    container.replaceChildren();
    const problem = (error && error.problem) || {};
    container.append(el("strong", { text: error.message || "The request failed." }));
    const errors = Array.isArray(problem.errors) ? problem.errors : [];
    if (errors.length) {
      container.append(
        el("ul", {}, errors.map((item) => {
          if (typeof item === "string") return el("li", { text: item });
          const field = item.field || item.pointer || item.name;
          const message = item.reason || item.message || item.detail || JSON.stringify(item);
          return el("li", {}, field ? el("code", { text: field }) : null, field ? ": " : "", message);
        })),
      );
    }
    container.hidden = false;
  }

  let toastTimer = null;
  function toast(message, { error = false } = {}) {
    const box = document.getElementById("toast");
    box.textContent = message;
    box.classList.toggle("error", error);
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { box.hidden = true; }, 4000);
  }

  function setupApiKey() {
    const input = document.getElementById("api-key");
    if (!input) return;
    input.value = apiKey();
    input.addEventListener("change", () => {
      if (input.value) window.localStorage.setItem(KEY_STORAGE, input.value);
      else window.localStorage.removeItem(KEY_STORAGE);
      toast(input.value ? "API key saved in this browser." : "API key removed.");
    });
  }

  /** Returns run(): calls `task` now, then again every `seconds` while it resolves to true.
   *  run() rejects when that call fails; later, scheduled calls only log their failures. A 4xx
   *  stops the loop (it will not heal itself); other failures are retried. */
  function every(seconds, task) {
    let timer = null;
    const schedule = () => {
      timer = setTimeout(() => run().catch((error) => console.warn("refresh failed:", error.message)), seconds * 1000);
    };
    const run = async () => {
      clearTimeout(timer);
      let again;
      try {
        again = await task();
      } catch (error) {
        if (!(error.status >= 400 && error.status < 500)) schedule();
        throw error;
      }
      if (again) schedule();
    };
    return run;
  }

  document.addEventListener("DOMContentLoaded", setupApiKey);

  return {
    ApiError, api, apiKey, drawFigure, el, formatNumber, formatPercent, formatDuration, formatDate,
    metricLabel, familyChip, progressBar, showProblem, toast, every, PARAM_LABELS, FAMILY_COLORS,
  };
})();
