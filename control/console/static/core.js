// What every view of the console uses: the API with the user's token, building elements, formatting figures.
// Data is only ever put on the page as text (textContent, attribute values), never as markup: a recorded path or a
// reason someone typed is shown as it is, whatever it holds.

const TOKEN_KEY = "meshlens.token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

// The API's answer as {ok, status, data}; an error is data.error, one line, whatever went wrong (never a throw).
export async function api(path, {method = "GET", body} = {}) {
  const headers = {"Accept": "application/json"};
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                              cache: "no-store"});
  } catch (e) {
    return {ok: false, status: 0, data: {error: "the control plane did not answer (" + e.message + ")"}};
  }
  let data;
  try {
    data = await resp.json();
  } catch (e) {
    data = {error: "the control plane answered HTTP " + resp.status + " without JSON"};
  }
  if (!resp.ok && (typeof data !== "object" || data === null || typeof data.error !== "string")) {
    data = {error: "the control plane answered HTTP " + resp.status};
  }
  return {ok: resp.ok, status: resp.status, data};
}

// h("div", {class: "card", onclick: fn}, "text", child, ...): an element; attributes as given, children as text.
export function h(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

const SVG_NS = "http://www.w3.org/2000/svg";

export function s(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// A one-line message on the page: kind is "error", "ok", "info" or "warn".
export function message(kind, text) {
  return h("div", {class: "msg msg-" + kind, role: kind === "error" ? "alert" : "status"}, text);
}

export function card(title, ...body) {
  return h("section", {class: "card"}, title ? h("h2", {}, title) : null, ...body);
}

export function table(headers, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))));
}

export function modeBadge(mode) {
  return h("span", {class: "mode mode-" + (mode || "none")}, mode || "no mode");
}

export const fmt = {
  rate: (x) => x === null || x === undefined ? "–" : x >= 10 ? x.toFixed(0) + "/s" : x.toPrecision(2) + "/s",
  pct: (x) => x === null || x === undefined ? "–" : (100 * x).toFixed(x < 0.001 && x > 0 ? 2 : 1) + "%",
  ms: (x) => x === null || x === undefined ? "–" : x >= 100 ? x.toFixed(0) + " ms" : x.toPrecision(2) + " ms",
  count: (x) => x === null || x === undefined ? "–" : Number(x).toLocaleString("en"),
  // a figure of unknown meaning: four significant digits are enough to read it
  any: (x) => typeof x === "number" && !Number.isInteger(x) ? String(Number(x.toPrecision(4))) : String(x),
  time: (unixSeconds) => new Date(unixSeconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z"),
  clock: (ms) => new Date(ms).toISOString().slice(11, 23),
};

// The window form every traffic view has: a duration text, applied by putting it in the URL's fragment.
export function windowForm(current, onApply) {
  const input = h("input", {name: "window", value: current, size: 6, "aria-label": "window",
                           title: "a duration: 90s, 15m, 1h, 7d"});
  return h("form", {class: "window", onsubmit: (e) => { e.preventDefault(); onApply(input.value.trim()); }},
    h("label", {}, "Last ", input), h("button", {type: "submit"}, "Apply"));
}
