// The tapeserve playground: builds POST /v1/gradient requests from the form, renders the answers as
// tables, plots f, f', f'' (one variable, uPlot) or contours with gradient arrows (two variables,
// drawn on a canvas), shows problem+json errors with their caret, and keeps its state in the URL hash.
// Plain browser JavaScript, no build step; every request goes to this server only.
"use strict";

(() => {
  const KEY_STORAGE = "tapeserve.apiKey";
  const DERIVATIVES = ["gradient", "jacobian", "hessian", "hvp", "jvp", "vjp"];
  // Past this many elements a tensor is summarized: a table of 10^5 cells freezes the page.
  const MAX_SHOWN_ELEMENTS = 400;
  // Bounds of the plot grids: enough for smooth curves, small enough for one quick batched request.
  const MAX_POINTS_1D = 2001;
  const MAX_GRID_2D = 101;
  const CONTOUR_LEVELS = 12;
  // Arrows per axis on the contour plot: dense enough to read the field, sparse enough to see the colors.
  const ARROWS_PER_AXIS = 15;

  const DEFAULT_STATE = {
    expression: "sin(x) * exp(-x**2 / 4)",
    variables: "x = 0.5",
    constants: "",
    derivatives: ["gradient", "hessian"],
    order: "",
    dtype: "float64",
    tangents: "",
    cotangent: "",
    functions: [],
    plot: true,
    xRange: [-4, 4],
    yRange: [-3, 3],
    points: 201,
    grid: 41,
  };

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) node.append(child);
    return node;
  };

  // ---------------------------------------------------------------- input parsing (client side)

  /** An input the page could not turn into a request, before anything was sent. */
  class FormError extends Error {
    constructor(field, detail) {
      super(detail);
      this.field = field;
    }
  }

  const NUMBER_WORDS = { nan: "NaN", inf: "Infinity", "+inf": "Infinity", "-inf": "-Infinity",
    infinity: "Infinity", "+infinity": "Infinity", "-infinity": "-Infinity" };

  /** One number as the wire wants it: a JSON number, or "NaN"/"Infinity"/"-Infinity". */
  function parseNumber(text, where) {
    const word = NUMBER_WORDS[text.trim().toLowerCase()];
    if (word) return word;
    if (!/^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i.test(text.trim())) {
      throw new FormError(where.field, `${where.label}: ${JSON.stringify(text.trim())} is not a number`);
    }
    return Number(text);
  }

  /** "1.5" -> 1.5, "1, 2, 3" -> [1, 2, 3], "[[1, 2], [3, 4]]" -> nested lists (nan/inf allowed). */
  function parseTensor(text, where) {
    const trimmed = text.trim();
    if (trimmed === "") throw new FormError(where.field, `${where.label}: a value is missing`);
    if (!trimmed.startsWith("[")) {
      const items = trimmed.split(",").map((item) => parseNumber(item, where));
      return items.length === 1 ? items[0] : items;
    }
    // Bare nan/inf words become the wire's strings; everything else must be JSON.
    const json = trimmed.replace(/([+-]?)\b(nan|inf|infinity)\b/gi,
      (_, sign, word) => JSON.stringify(NUMBER_WORDS[(sign + word).toLowerCase()] || "NaN"));
    let value;
    try {
      value = JSON.parse(json);
    } catch (error) {
      throw new FormError(where.field, `${where.label}: not a list of numbers (${error.message})`);
    }
    const check = (item) => {
      if (Array.isArray(item)) return item.forEach(check);
      if (typeof item === "number" || ["NaN", "Infinity", "-Infinity"].includes(item)) return undefined;
      throw new FormError(where.field, `${where.label}: ${JSON.stringify(item)} is not a number`);
    };
    check(value);
    return value;
  }

  /** Lines of `name = value` (blank lines and # comments skipped) -> {name: tensor}. */
  function parseAssignments(text, field) {
    const out = {};
    text.split("\n").forEach((line, index) => {
      const content = line.replace(/#.*$/, "").trim();
      if (content === "") return;
      const where = { field, label: `${field}, line ${index + 1}` };
      const match = /^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$/.exec(content);
      if (!match) throw new FormError(field, `${where.label}: expected name = value, e.g. x = 0.5`);
      if (match[1] in out) throw new FormError(field, `${where.label}: ${match[1]} is given twice`);
      out[match[1]] = parseTensor(match[2], { field, label: `${where.label} (${match[1]})` });
    });
    return out;
  }

  const isScalar = (tensor) => !Array.isArray(tensor);

  // ---------------------------------------------------------------- the form <-> state

  function functionRows() {
    return Array.from($("functions").tBodies[0].rows);
  }

  function readFunctions() {
    return functionRows().map((row) => {
      const gradient = {};
      row.querySelectorAll("input.fn-grad").forEach((input) => {
        if (input.value.trim() !== "") gradient[input.dataset.param] = input.value;
      });
      return {
        name: row.querySelector(".fn-name").value.trim(),
        params: splitParams(row.querySelector(".fn-params").value),
        body: row.querySelector(".fn-body").value,
        gradient,
      };
    });
  }

  const splitParams = (text) => text.split(",").map((p) => p.trim()).filter((p) => p !== "");

  function readForm() {
    const number = (id, fallback) => {
      const value = Number.parseFloat($(id).value);
      return Number.isFinite(value) ? value : fallback;
    };
    return {
      expression: $("expression").value,
      variables: $("variables").value,
      constants: $("constants").value,
      derivatives: DERIVATIVES.filter((d) => document.querySelector(`input[value="${d}"]`).checked),
      order: $("order").value,
      dtype: $("dtype").value,
      tangents: $("tangents").value,
      cotangent: $("cotangent").value,
      functions: readFunctions(),
      plot: $("plot-enabled").checked,
      xRange: [number("x-min", DEFAULT_STATE.xRange[0]), number("x-max", DEFAULT_STATE.xRange[1])],
      yRange: [number("y-min", DEFAULT_STATE.yRange[0]), number("y-max", DEFAULT_STATE.yRange[1])],
      points: Math.round(number("points", DEFAULT_STATE.points)),
      grid: Math.round(number("grid", DEFAULT_STATE.grid)),
    };
  }

  function applyState(state) {
    $("expression").value = state.expression;
    $("variables").value = state.variables;
    $("constants").value = state.constants;
    for (const d of DERIVATIVES) {
      document.querySelector(`input[value="${d}"]`).checked = state.derivatives.includes(d);
    }
    $("order").value = state.order;
    $("dtype").value = state.dtype;
    $("tangents").value = state.tangents;
    $("cotangent").value = state.cotangent;
    $("functions").tBodies[0].replaceChildren();
    state.functions.forEach(addFunctionRow);
    $("plot-enabled").checked = state.plot;
    [$("x-min").value, $("x-max").value] = state.xRange;
    [$("y-min").value, $("y-max").value] = state.yRange;
    $("points").value = state.points;
    $("grid").value = state.grid;
    updateDerivativeFields();
    clearHighlights();
  }

  function updateDerivativeFields() {
    const checked = (d) => document.querySelector(`input[value="${d}"]`).checked;
    $("tangents-field").hidden = !(checked("hvp") || checked("jvp"));
    $("cotangent-field").hidden = !checked("vjp");
  }

  function addFunctionRow(fn = { name: "", params: [], body: "", gradient: {} }) {
    const name = el("input", { class: "fn-name", placeholder: "softclip", spellcheck: "false" });
    const params = el("input", { class: "fn-params", placeholder: "x, a", spellcheck: "false" });
    const body = el("input", { class: "fn-body", placeholder: "a * tanh(x / a)", spellcheck: "false" });
    const gradientCell = el("td", { class: "fn-gradient" });
    const remove = el("button", { type: "button", class: "fn-remove", title: "Remove", text: "\u00d7" });
    name.value = fn.name;
    params.value = fn.params.join(", ");
    body.value = fn.body;
    const row = el("tr", {}, el("td", {}, name), el("td", {}, params), el("td", {}, body), gradientCell,
      el("td", {}, remove));
    const renderGradients = (values) => {
      gradientCell.replaceChildren(...splitParams(params.value).map((param) => {
        const input = el("input", { class: "fn-grad", spellcheck: "false", placeholder: "dy * ..." });
        input.dataset.param = param;
        input.value = values[param] || "";
        return el("label", { class: "fn-grad-label" }, el("span", { text: `\u2202/\u2202${param}` }), input);
      }));
    };
    params.addEventListener("input", () => {
      const values = {};
      gradientCell.querySelectorAll("input.fn-grad").forEach((i) => { values[i.dataset.param] = i.value; });
      renderGradients(values);
    });
    remove.addEventListener("click", () => row.remove());
    renderGradients(fn.gradient || {});
    $("functions").tBodies[0].append(row);
    return row;
  }

  // ---------------------------------------------------------------- shareable state in the URL hash
  // The hash, not the query: it never reaches the server, so expressions stay out of access logs.

  function encodeState(state) {
    const params = new URLSearchParams();
    params.set("e", state.expression);
    if (state.variables) params.set("v", state.variables);
    if (state.constants) params.set("c", state.constants);
    params.set("d", state.derivatives.join(","));
    if (state.order) params.set("o", state.order);
    params.set("t", state.dtype);
    if (state.tangents) params.set("tg", state.tangents);
    if (state.cotangent) params.set("ct", state.cotangent);
    if (state.functions.length) params.set("f", JSON.stringify(state.functions));
    params.set("p", state.plot ? "1" : "0");
    params.set("x", state.xRange.join(","));
    params.set("y", state.yRange.join(","));
    params.set("n", String(state.points));
    params.set("g", String(state.grid));
    return params.toString();
  }

  function decodeState(hash) {
    const params = new URLSearchParams(hash.replace(/^#/, ""));
    if (!params.has("e")) return null;
    const range = (key, fallback) => {
      const parts = (params.get(key) || "").split(",").map(Number);
      return parts.length === 2 && parts.every(Number.isFinite) ? parts : fallback;
    };
    const integer = (key, fallback) => {
      const value = Number.parseInt(params.get(key) || "", 10);
      return Number.isFinite(value) ? value : fallback;
    };
    let functions = [];
    try {
      const parsed = JSON.parse(params.get("f") || "[]");
      if (Array.isArray(parsed)) {
        functions = parsed.filter((f) => f && typeof f === "object").map((f) => ({
          name: String(f.name || ""),
          params: Array.isArray(f.params) ? f.params.map(String) : [],
          body: String(f.body || ""),
          gradient: f.gradient && typeof f.gradient === "object" ? f.gradient : {},
        }));
      }
    } catch (_) {
      functions = []; // a mangled link still restores everything else
    }
    return {
      expression: params.get("e"),
      variables: params.get("v") || "",
      constants: params.get("c") || "",
      derivatives: (params.get("d") || "").split(",").filter((d) => DERIVATIVES.includes(d)),
      order: ["1", "2", "3", "4"].includes(params.get("o")) ? params.get("o") : "",
      dtype: params.get("t") === "float32" ? "float32" : "float64",
      tangents: params.get("tg") || "",
      cotangent: params.get("ct") || "",
      functions,
      plot: params.get("p") !== "0",
      xRange: range("x", DEFAULT_STATE.xRange),
      yRange: range("y", DEFAULT_STATE.yRange),
      points: integer("n", DEFAULT_STATE.points),
      grid: integer("g", DEFAULT_STATE.grid),
    };
  }

  let writingHash = false;
  function writeHash(state) {
    const hash = "#" + encodeState(state);
    if (location.hash !== hash) {
      writingHash = true; // replaceState fires no hashchange, but be explicit about our own writes
      history.replaceState(null, "", hash);
      writingHash = false;
    }
  }

  // ---------------------------------------------------------------- requests

  function buildRequest(state) {
    if (state.expression.trim() === "") throw new FormError("expression", "expression: type an expression");
    const request = {
      expression: state.expression,
      variables: parseAssignments(state.variables, "variables"),
      constants: parseAssignments(state.constants, "constants"),
      derivatives: state.derivatives,
      dtype: state.dtype,
    };
    const functions = {};
    state.functions.forEach((fn, index) => {
      if (fn.name === "" && fn.body.trim() === "") return; // an untouched new row
      if (fn.name === "") throw new FormError(`functions[${index}]`, `functions, row ${index + 1}: give it a name`);
      if (fn.name in functions) {
        throw new FormError(`functions.${fn.name}`, `functions: ${fn.name} is defined twice`);
      }
      const definition = { params: fn.params, body: fn.body };
      if (Object.keys(fn.gradient).length) definition.gradient = fn.gradient;
      functions[fn.name] = definition;
    });
    if (Object.keys(functions).length) request.functions = functions;
    if (state.order) request.order = Number(state.order);
    if (state.derivatives.includes("hvp") || state.derivatives.includes("jvp")) {
      request.tangents = parseAssignments(state.tangents, "tangents");
    }
    if (state.derivatives.includes("vjp")) {
      request.cotangent = parseTensor(state.cotangent, { field: "cotangent", label: "cotangent" });
    }
    return request;
  }

  /** A problem the page shows: a server's problem+json, or one made up here in the same shape. */
  class Problem extends Error {
    constructor(body) {
      super(body.detail || body.title);
      this.body = body;
    }
  }

  async function callApi(method, path, body) {
    const headers = { Accept: "application/json, application/problem+json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = `Bearer ${key}`;
    let response;
    try {
      response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (error) {
      throw new Problem({ title: "The server could not be reached", detail: String(error.message || error) });
    }
    const text = await response.text();
    let data = null;
    try {
      data = JSON.parse(text);
    } catch (_) {
      data = null;
    }
    if (response.ok && data !== null) return data;
    const problem = data && typeof data === "object" && !Array.isArray(data) ? data
      : { title: `HTTP ${response.status}`, detail: text.slice(0, 500) || response.statusText };
    problem.status = problem.status || response.status;
    if (response.status === 401 || response.status === 403) {
      problem.hint = key ? "The API key was refused: check it in the field at the top."
        : "This server needs an API key: enter it in the field at the top.";
    } else if (response.headers.get("Retry-After")) {
      problem.hint = `Retry after ${response.headers.get("Retry-After")} s.`;
    }
    throw new Problem(problem);
  }

  // ---------------------------------------------------------------- numbers and tables

  /** A wire tensor with "NaN"/"Infinity" strings -> the same nesting with JS numbers. */
  function toNumbers(tensor) {
    if (Array.isArray(tensor)) return tensor.map(toNumbers);
    if (typeof tensor === "string") return tensor === "NaN" ? NaN : tensor.startsWith("-") ? -Infinity : Infinity;
    return tensor;
  }

  function formatNumber(value) {
    if (typeof value === "string") return value;
    if (typeof value === "boolean") return String(value);
    if (Number.isInteger(value) && Math.abs(value) < 1e15) return String(value);
    const text = value.toPrecision(10);
    // 1.500000000 -> 1.5; 1.000000000e+5 -> 1e+5
    return text.includes("e") ? text.replace(/\.?0+e/, "e") : text.replace(/\.?0+$/, "");
  }

  function numberCell(value, key) {
    const span = el("span", { class: "num", text: formatNumber(value), title: String(value) });
    span.dataset.key = key;
    span.dataset.value = String(value);
    return span;
  }

  const shapeOf = (tensor) => (Array.isArray(tensor) ? [tensor.length, ...(tensor.length ? shapeOf(tensor[0]) : [])] : []);
  const sizeOf = (shape) => shape.reduce((a, b) => a * b, 1);

  /** A tensor as a number (0-d), a row (1-d), a matrix table (2-d) or indented text (more axes). */
  function renderTensor(tensor, key) {
    const shape = shapeOf(tensor);
    if (shape.length === 0) return numberCell(tensor, key);
    if (sizeOf(shape) > MAX_SHOWN_ELEMENTS || shape.length > 2) {
      const text = sizeOf(shape) > MAX_SHOWN_ELEMENTS ? `${JSON.stringify(tensor).slice(0, 2000)} \u2026`
        : JSON.stringify(tensor);
      return el("div", {}, el("span", { class: "shape", text: `shape [${shape.join(", ")}]` }),
        el("pre", { class: "tensor", text }));
    }
    const table = el("table", { class: "tensor" });
    const rows = shape.length === 1 ? [tensor] : tensor;
    rows.forEach((row, i) => {
      const tr = el("tr");
      row.forEach((value, j) => {
        tr.append(el("td", {}, numberCell(value, shape.length === 1 ? `${key}[${j}]` : `${key}[${i}][${j}]`)));
      });
      table.append(tr);
    });
    return el("div", {}, el("span", { class: "shape", text: `shape [${shape.join(", ")}]` }), table);
  }

  function section(title, ...content) {
    return el("section", { class: "result" }, el("h3", { text: title }), ...content);
  }

  /** {name: tensor} as a two-column table. */
  function perVariable(map, key) {
    const table = el("table", { class: "named" });
    for (const [name, tensor] of Object.entries(map)) {
      table.append(el("tr", {}, el("th", { text: name }), el("td", {}, renderTensor(tensor, `${key}.${name}`))));
    }
    return table;
  }

  function renderHessian(hessian) {
    const names = Object.keys(hessian);
    const allScalar = names.every((a) => names.every((b) => isScalar(hessian[a][b])));
    if (allScalar) {
      const table = el("table", { class: "tensor hessian" });
      table.append(el("tr", {}, el("th"), ...names.map((b) => el("th", { text: b }))));
      for (const a of names) {
        table.append(el("tr", {}, el("th", { text: a }),
          ...names.map((b) => el("td", {}, numberCell(hessian[a][b], `hessian.${a}.${b}`)))));
      }
      return table;
    }
    const table = el("table", { class: "named" });
    for (const a of names) {
      for (const b of Object.keys(hessian[a])) {
        table.append(el("tr", {}, el("th", { text: `\u2202\u00b2/\u2202${a}\u2202${b}` }),
          el("td", {}, renderTensor(hessian[a][b], `hessian.${a}.${b}`))));
      }
    }
    return table;
  }

  function renderResults(response) {
    const out = [section("value", renderTensor(response.value, "value"))];
    if (response.gradient) out.push(section("gradient", perVariable(response.gradient, "gradient")));
    if (response.jacobian) out.push(section("Jacobian", perVariable(response.jacobian, "jacobian")));
    if (response.hessian) out.push(section("Hessian", renderHessian(response.hessian)));
    if (response.hvp) out.push(section("Hessian\u00b7v", perVariable(response.hvp, "hvp")));
    if (response.jvp !== undefined) out.push(section("J\u00b7v", renderTensor(response.jvp, "jvp")));
    if (response.vjp) out.push(section("u\u00b7J", perVariable(response.vjp, "vjp")));
    if (response.derivative) {
      const { variable, derivatives } = response.derivative;
      const table = el("table", { class: "named" });
      derivatives.forEach((d, i) => {
        const label = i === 0 ? `d/d${variable}` : `d${i + 1}/d${variable}${i + 1}`;
        table.append(el("tr", {}, el("th", { text: label }), el("td", {}, renderTensor(d, `derivative.${i + 1}`))));
      });
      out.push(section(`derivatives in ${variable}`, table));
    }
    const meta = response.meta || {};
    const timing = meta.total_ms === undefined ? "" : `, ${meta.compute_ms.toFixed(1)} ms in the worker, ${meta.total_ms.toFixed(1)} ms in all`;
    out.push(el("p", { class: "meta", text: `${response.dtype}; ${meta.cache === "hit" ? "cached program reused" : "program compiled for this request"}${timing}` }));
    $("results").replaceChildren(...out);
  }

  // ---------------------------------------------------------------- errors and their caret

  function clearHighlights() {
    renderBackdrop(null);
    document.querySelectorAll(".has-error").forEach((node) => node.classList.remove("has-error"));
  }

  function clearError() {
    $("error").hidden = true;
    clearHighlights();
  }

  /** Mirror the expression under the transparent textarea, with the error's character marked. */
  function renderBackdrop(location) {
    const backdrop = $("expression-backdrop");
    const text = $("expression").value;
    backdrop.replaceChildren();
    if (!location) {
      backdrop.textContent = text + "\n";
      return;
    }
    const lines = text.split("\n");
    const line = Math.min(Math.max(location.line, 1), lines.length);
    let offset = lines.slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
    offset += Math.min(Math.max(location.column - 1, 0), lines[line - 1].length);
    // At the end of a line (an operand is missing) there is no character: mark an inserted space.
    const inside = offset < text.length && text[offset] !== "\n";
    const mark = el("mark", { id: "expression-mark", text: inside ? text[offset] : " " });
    mark.dataset.line = String(location.line);
    mark.dataset.column = String(location.column);
    const rest = inside ? text.slice(offset + 1) : text.slice(offset);
    backdrop.append(text.slice(0, offset), mark, rest + "\n");
    backdrop.scrollTop = $("expression").scrollTop;
  }

  /** Outline the input the problem is about: the expression (with a marked character), a function's
   * body or gradient, or the variables/constants/tangents box. */
  function highlight(body) {
    const source = String(body.source || body.field || "");
    if (source === "expression" && body.line !== undefined && body.column !== undefined) {
      renderBackdrop({ line: Number(body.line), column: Number(body.column) });
      $("expression").classList.add("has-error");
      return;
    }
    if (source === "expression") {
      $("expression").classList.add("has-error");
      return;
    }
    const fn = /^functions\.([^.[]+)(?:\.(body|params|gradient)(?:\.(.+))?)?/.exec(source);
    if (fn) {
      for (const row of functionRows()) {
        if (row.querySelector(".fn-name").value.trim() !== fn[1]) continue;
        let target = row.querySelector(".fn-name");
        if (fn[2] === "body") target = row.querySelector(".fn-body");
        if (fn[2] === "params") target = row.querySelector(".fn-params");
        if (fn[2] === "gradient") {
          target = Array.from(row.querySelectorAll("input.fn-grad")).find((i) => i.dataset.param === fn[3])
            || row.querySelector(".fn-gradient");
        }
        target.classList.add("has-error");
      }
      return;
    }
    const box = /^(variables|constants|tangents|cotangent)\b/.exec(source);
    if (box) $(box[1]).classList.add("has-error");
  }

  function showProblem(error) {
    const body = error instanceof Problem ? error.body
      : error instanceof FormError ? { title: "The form could not be read", detail: error.message, field: error.field }
        : { title: "Unexpected error in the page", detail: String(error && error.stack || error) };
    $("error-title").textContent = body.title || "Error";
    $("error-code").textContent = body.code ? `${body.status || ""} ${body.code}`.trim() : "";
    let detail = body.detail || "";
    if (body.suggestions && body.suggestions.length) detail += ` (did you mean ${body.suggestions.join(", ")}?)`;
    if (body.hint) detail += ` ${body.hint}`;
    $("error-detail").textContent = detail;
    const snippet = $("error-snippet");
    snippet.hidden = !body.snippet;
    snippet.textContent = body.snippet || "";
    const list = $("error-list");
    const items = Array.isArray(body.errors) ? body.errors : [];
    list.hidden = items.length === 0;
    list.replaceChildren(...items.map((e) => el("li", { text: `${e.field || ""}: ${e.message || ""}` })));
    $("error").hidden = false;
    clearHighlights();
    highlight(body);
  }

  // ---------------------------------------------------------------- plots

  function linspace(lo, hi, n) {
    return Array.from({ length: n }, (_, i) => lo + ((hi - lo) * i) / (n - 1));
  }

  let plot1d = null;
  const plotState = { kind: null, data: null }; // read by the browser tests

  function clearPlot(message) {
    if (plot1d) {
      plot1d.destroy();
      plot1d = null;
    }
    $("plot1d").hidden = true;
    $("plot2d").hidden = true;
    $("plot2d").dataset.arrows = "0";
    plotState.kind = null;
    plotState.data = null;
    $("plot-status").textContent = message || "";
  }

  /** Which plot the variables allow: one or two scalar variables. */
  function plotVariables(request) {
    const names = Object.keys(request.variables);
    if (names.length === 0 || names.length > 2) return { names, reason: "plots need one or two variables" };
    const nonScalar = names.filter((n) => !isScalar(request.variables[n]));
    if (nonScalar.length) return { names, reason: `plots need scalar variables; ${nonScalar.join(", ")} is not` };
    return { names, reason: null };
  }

  function checkRange(range, label) {
    if (!(range[0] < range[1])) throw new FormError("plot", `plot: the ${label} range must go from low to high`);
  }

  async function runPlot(state, request) {
    const { names, reason } = plotVariables(request);
    if (reason) {
      clearPlot(`No plot: ${reason}.`);
      return;
    }
    const base = { expression: request.expression, constants: request.constants, dtype: request.dtype, batch: true };
    if (request.functions) base.functions = request.functions;
    try {
      if (names.length === 1) await plotOne(state, base, names[0]);
      else await plotTwo(state, base, names);
    } catch (error) {
      const body = error instanceof Problem ? error.body : { detail: error.message };
      clearPlot(`No plot: ${body.detail || body.title}`);
    }
  }

  async function plotOne(state, base, name) {
    checkRange(state.xRange, "1st variable's");
    const n = Math.min(Math.max(state.points, 3), MAX_POINTS_1D);
    const xs = linspace(state.xRange[0], state.xRange[1], n);
    // One batched request: every grid point is an independent x; order 2 gives f' and f'' per point.
    const response = await callApi("POST", "v1/gradient",
      { ...base, variables: { [name]: xs }, derivatives: [], order: 2 });
    const f = toNumbers(response.value);
    const [d1, d2] = response.derivative.derivatives.map(toNumbers);
    const finiteOrNull = (values) => values.map((v) => (Number.isFinite(v) ? v : null));
    const data = [xs, finiteOrNull(f), finiteOrNull(d1), finiteOrNull(d2)];
    clearPlot(`f, f\u2032 and f\u2033 over ${name} in [${state.xRange.join(", ")}], ${n} points, one batched request`);
    const container = $("plot1d");
    container.hidden = false;
    const width = Math.max(container.clientWidth || 0, 320);
    plot1d = new uPlot({
      width,
      height: 340,
      scales: { x: { time: false } },
      axes: [{ label: name }, {}],
      series: [
        { label: name, value: (_, v) => (v === null ? "\u2013" : formatNumber(v)) },
        { label: "f", stroke: "#1f5fbf", width: 2 },
        { label: "f\u2032", stroke: "#d9480f", width: 1.5 },
        { label: "f\u2033", stroke: "#2b8a3e", width: 1.5, dash: [6, 4] },
      ],
    }, data, container);
    plotState.kind = "1d";
    plotState.data = { variable: name, x: xs, f, d1, d2 };
  }

  async function plotTwo(state, base, names) {
    checkRange(state.xRange, "1st variable's");
    checkRange(state.yRange, "2nd variable's");
    const g = Math.min(Math.max(state.grid, 3), MAX_GRID_2D);
    const xs = linspace(state.xRange[0], state.xRange[1], g);
    const ys = linspace(state.yRange[0], state.yRange[1], g);
    const px = [];
    const py = [];
    for (let j = 0; j < g; j += 1) {
      for (let i = 0; i < g; i += 1) {
        px.push(xs[i]);
        py.push(ys[j]);
      }
    }
    // One batched request over the whole grid: values for the contours, gradients for the arrows.
    const response = await callApi("POST", "v1/gradient",
      { ...base, variables: { [names[0]]: px, [names[1]]: py }, derivatives: ["gradient"] });
    const values = toNumbers(response.value);
    const gx = toNumbers(response.gradient[names[0]]);
    const gy = toNumbers(response.gradient[names[1]]);
    clearPlot(`${names.join(", ")}: contours of f and its gradient on a ${g}\u00d7${g} grid, one batched request`);
    const arrows = drawContours($("plot2d"), { xs, ys, values, gx, gy, names });
    plotState.kind = "2d";
    plotState.data = { names, xs, ys, values, gx, gy, arrows };
  }

  // Viridis at 9 stops; linear in between (perceptually even, readable in grey).
  const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];

  function colorAt(t) {
    const x = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
    const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
    const f = x - i;
    return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
  }

  function niceTicks(lo, hi, count) {
    const step0 = (hi - lo) / count;
    const magnitude = 10 ** Math.floor(Math.log10(step0));
    const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= step0) || step0;
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    return ticks;
  }

  /** Heatmap (bilinear), contour lines (marching squares) and gradient arrows; returns the arrow count. */
  function drawContours(canvas, { xs, ys, values, gx, gy, names }) {
    canvas.hidden = false;
    const cssWidth = Math.min(Math.max(canvas.parentElement.clientWidth || 600, 360), 720);
    const cssHeight = Math.round(cssWidth * 0.76);
    const ratio = window.devicePixelRatio || 1;
    canvas.style.width = `${cssWidth}px`;
    canvas.style.height = `${cssHeight}px`;
    canvas.width = Math.round(cssWidth * ratio);
    canvas.height = Math.round(cssHeight * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, cssWidth, cssHeight);
    const m = { left: 56, right: 84, top: 12, bottom: 44 };
    const w = cssWidth - m.left - m.right;
    const h = cssHeight - m.top - m.bottom;
    const g = xs.length;
    const at = (i, j) => values[j * g + i];
    const finite = values.filter(Number.isFinite);
    const vmin = finite.length ? Math.min(...finite) : 0;
    const vmax = finite.length ? Math.max(...finite) : 1;
    const span = vmax - vmin || 1;
    const toPx = (x, y) => [m.left + ((x - xs[0]) / (xs[g - 1] - xs[0])) * w,
      m.top + h - ((y - ys[0]) / (ys[g - 1] - ys[0])) * h];

    // Heatmap at device resolution, bilinear between grid points.
    const pw = Math.round(w * ratio);
    const ph = Math.round(h * ratio);
    const image = ctx.createImageData(pw, ph);
    for (let py = 0; py < ph; py += 1) {
      const v = (1 - (py + 0.5) / ph) * (g - 1);
      const j = Math.min(Math.floor(v), g - 2);
      const fy = v - j;
      for (let px = 0; px < pw; px += 1) {
        const u = ((px + 0.5) / pw) * (g - 1);
        const i = Math.min(Math.floor(u), g - 2);
        const fx = u - i;
        const value = (1 - fx) * (1 - fy) * at(i, j) + fx * (1 - fy) * at(i + 1, j)
          + (1 - fx) * fy * at(i, j + 1) + fx * fy * at(i + 1, j + 1);
        const k = (py * pw + px) * 4;
        if (Number.isFinite(value)) {
          const [r, gg, b] = colorAt((value - vmin) / span);
          image.data[k] = r;
          image.data[k + 1] = gg;
          image.data[k + 2] = b;
          image.data[k + 3] = 255;
        } // non-finite: left transparent, a hole in the map
      }
    }
    ctx.putImageData(image, Math.round(m.left * ratio), Math.round(m.top * ratio));

    // Contour lines by marching squares; saddles split by the cell's mean.
    ctx.lineWidth = 1;
    ctx.strokeStyle = "rgba(255, 255, 255, 0.75)";
    for (let level = 1; level < CONTOUR_LEVELS; level += 1) {
      const c = vmin + (span * level) / CONTOUR_LEVELS;
      ctx.beginPath();
      for (let j = 0; j < g - 1; j += 1) {
        for (let i = 0; i < g - 1; i += 1) {
          const corners = [[i, j], [i + 1, j], [i + 1, j + 1], [i, j + 1]];
          const v = corners.map(([a, b]) => at(a, b));
          if (!v.every(Number.isFinite)) continue;
          const crossings = [];
          for (let e = 0; e < 4; e += 1) {
            const a = v[e];
            const b = v[(e + 1) % 4];
            if ((a < c) !== (b < c)) {
              const t = (c - a) / (b - a);
              const [ia, ja] = corners[e];
              const [ib, jb] = corners[(e + 1) % 4];
              crossings.push(toPx(xs[ia] + t * (xs[ib] - xs[ia]), ys[ja] + t * (ys[jb] - ys[ja])));
            }
          }
          if (crossings.length === 2) {
            ctx.moveTo(...crossings[0]);
            ctx.lineTo(...crossings[1]);
          } else if (crossings.length === 4) {
            const centerAbove = v.reduce((s, x) => s + x, 0) / 4 >= c;
            const firstAbove = v[0] >= c;
            const pairs = centerAbove === firstAbove ? [[0, 1], [2, 3]] : [[0, 3], [1, 2]];
            for (const [p, q] of pairs) {
              ctx.moveTo(...crossings[p]);
              ctx.lineTo(...crossings[q]);
            }
          }
        }
      }
      ctx.stroke();
    }

    // Gradient arrows (uphill) on a sub-grid, centred on their points, the longest as long as the
    // spacing between arrows; the sub-grid starts half a step in so no arrow leaves the frame.
    const step = Math.max(1, Math.round((g - 1) / (ARROWS_PER_AXIS - 1)));
    const first = Math.floor(step / 2);
    const sx = w / (xs[g - 1] - xs[0]);
    const sy = h / (ys[g - 1] - ys[0]);
    const picked = [];
    let longest = 0;
    for (let j = first; j < g; j += step) {
      for (let i = first; i < g; i += step) {
        const k = j * g + i;
        const dx = gx[k] * sx;
        const dy = -gy[k] * sy;
        if (!Number.isFinite(dx) || !Number.isFinite(dy)) continue;
        picked.push([i, j, dx, dy]);
        longest = Math.max(longest, Math.hypot(dx, dy));
      }
    }
    const spacing = Math.min((w / (g - 1)) * step, (h / (g - 1)) * step) * 0.9;
    ctx.strokeStyle = "#111";
    ctx.fillStyle = "#111";
    ctx.lineWidth = 1.2;
    ctx.save();
    ctx.beginPath();
    ctx.rect(m.left, m.top, w, h);
    ctx.clip();
    let drawn = 0;
    for (const [i, j, dx, dy] of picked) {
      const [cx, cy] = toPx(xs[i], ys[j]);
      const length = longest > 0 ? (Math.hypot(dx, dy) / longest) * spacing : 0;
      if (length < 1.5) {
        ctx.fillRect(cx - 1, cy - 1, 2, 2); // a stationary point: a dot, no direction
        continue;
      }
      const ux = dx / Math.hypot(dx, dy);
      const uy = dy / Math.hypot(dx, dy);
      const [x0, y0] = [cx - (ux * length) / 2, cy - (uy * length) / 2];
      const [x1, y1] = [cx + (ux * length) / 2, cy + (uy * length) / 2];
      const head = Math.min(5, length * 0.4);
      ctx.beginPath();
      ctx.moveTo(x0, y0);
      ctx.lineTo(x1, y1);
      ctx.moveTo(x1, y1);
      ctx.lineTo(x1 - head * (ux - 0.5 * uy), y1 - head * (uy + 0.5 * ux));
      ctx.moveTo(x1, y1);
      ctx.lineTo(x1 - head * (ux + 0.5 * uy), y1 - head * (uy - 0.5 * ux));
      ctx.stroke();
      drawn += 1;
    }
    ctx.restore();

    // Frame, ticks and axis names.
    ctx.strokeStyle = "#333";
    ctx.fillStyle = "#222";
    ctx.lineWidth = 1;
    ctx.strokeRect(m.left, m.top, w, h);
    ctx.font = "12px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const t of niceTicks(xs[0], xs[g - 1], 6)) {
      const [x] = toPx(t, ys[0]);
      ctx.beginPath(); ctx.moveTo(x, m.top + h); ctx.lineTo(x, m.top + h + 4); ctx.stroke();
      ctx.fillText(formatNumber(Number(t.toPrecision(6))), x, m.top + h + 6);
    }
    ctx.fillText(names[0], m.left + w / 2, m.top + h + 24);
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const t of niceTicks(ys[0], ys[g - 1], 6)) {
      const [, y] = toPx(xs[0], t);
      ctx.beginPath(); ctx.moveTo(m.left - 4, y); ctx.lineTo(m.left, y); ctx.stroke();
      ctx.fillText(formatNumber(Number(t.toPrecision(6))), m.left - 6, y);
    }
    ctx.save();
    ctx.translate(14, m.top + h / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "center";
    ctx.fillText(names[1], 0, 0);
    ctx.restore();

    // Color bar with the value range.
    const bx = m.left + w + 16;
    for (let k = 0; k < h; k += 1) {
      const [r, gg, b] = colorAt(1 - k / h);
      ctx.fillStyle = `rgb(${r}, ${gg}, ${b})`;
      ctx.fillRect(bx, m.top + k, 14, 1);
    }
    ctx.strokeRect(bx, m.top, 14, h);
    ctx.fillStyle = "#222";
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillText(formatNumber(Number(vmax.toPrecision(4))), bx + 18, m.top);
    ctx.textBaseline = "bottom";
    ctx.fillText(formatNumber(Number(vmin.toPrecision(4))), bx + 18, m.top + h);
    canvas.dataset.arrows = String(drawn);
    return drawn;
  }

  // ---------------------------------------------------------------- running

  let runCounter = 0;

  async function run() {
    const mine = (runCounter += 1);
    const started = performance.now();
    clearError();
    const state = readForm();
    writeHash(state);
    $("status").textContent = "computing\u2026";
    document.body.dataset.state = "running";
    let request;
    try {
      request = buildRequest(state);
    } catch (error) {
      $("results").replaceChildren();
      clearPlot();
      showProblem(error);
      $("status").textContent = "";
      document.body.dataset.state = "error";
      return;
    }
    let failed = false;
    const main = callApi("POST", "v1/gradient", request).then(
      (response) => { if (mine === runCounter) renderResults(response); },
      (error) => {
        failed = true;
        if (mine !== runCounter) return;
        $("results").replaceChildren();
        showProblem(error);
      });
    const plot = state.plot ? runPlot(state, request) : Promise.resolve(clearPlot());
    await Promise.all([main, plot]);
    if (mine !== runCounter) return; // a newer run owns the page
    const ms = performance.now() - started;
    $("status").textContent = failed ? "failed" : `done in ${ms.toFixed(0)} ms`;
    document.body.dataset.state = failed ? "error" : "done";
  }

  async function loadReference() {
    const target = $("reference-body");
    if (target.dataset.loaded) return;
    try {
      const reference = await callApi("GET", "v1/functions");
      const table = el("table", { class: "reference" });
      for (const f of reference.functions) {
        table.append(el("tr", {}, el("td", {}, el("code", { text: f.signature })), el("td", { text: f.doc }),
          el("td", { class: "category", text: f.category })));
      }
      const syntax = el("ul", {}, ...reference.syntax.map((s) => el("li", { text: s })));
      target.replaceChildren(syntax, table);
      target.dataset.loaded = "1";
    } catch (error) {
      target.textContent = `Could not load the list: ${error.message}`;
    }
  }

  function init() {
    const keyInput = $("api-key");
    keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
    keyInput.addEventListener("input", () => {
      if (keyInput.value) sessionStorage.setItem(KEY_STORAGE, keyInput.value);
      else sessionStorage.removeItem(KEY_STORAGE);
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      keyInput.value = "";
    });
    $("form").addEventListener("submit", (event) => {
      event.preventDefault();
      run();
    });
    $("form").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        run();
      }
    });
    const expression = $("expression");
    expression.addEventListener("input", () => {
      expression.classList.remove("has-error");
      renderBackdrop(null);
    });
    expression.addEventListener("scroll", () => { $("expression-backdrop").scrollTop = expression.scrollTop; });
    document.querySelectorAll('input[name="derivative"]').forEach((box) => box.addEventListener("change", updateDerivativeFields));
    $("add-function").addEventListener("click", () => addFunctionRow().querySelector(".fn-name").focus());
    $("copy-link").addEventListener("click", async () => {
      writeHash(readForm());
      try {
        await navigator.clipboard.writeText(location.href);
        $("status").textContent = "link copied";
      } catch (_) {
        $("status").textContent = "the address bar holds the link";
      }
    });
    $("reference").addEventListener("toggle", () => { if ($("reference").open) loadReference(); });
    window.addEventListener("hashchange", () => {
      if (writingHash) return;
      const state = decodeState(location.hash);
      if (state) {
        applyState(state);
        run();
      }
    });
    applyState(decodeState(location.hash) || DEFAULT_STATE);
    window.tapeservePlayground = { plotState, run, readForm, encodeState };
    run();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
