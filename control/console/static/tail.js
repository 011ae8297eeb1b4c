// The live tail: the newest calls, every row as its observer recorded it, filtered by service and status class,
// asked for again every POLL_MS with the cursor of the last answer. Rows reach the store in batches, a second or so
// late, so each ask starts OVERLAP_NS before the newest row shown and the rows already shown are dropped.
import {api, fmt, h, message, modeBadge} from "./core.js";

const POLL_MS = 1500;
const OVERLAP_NS = 10n * 1000000000n;
const KEEP = 300;  // rows on the page
const ASK = 200;   // rows an answer may hold

export async function renderTail(main, route, go) {
  const service = route.query.get("service") || "";
  const status = route.query.get("status") || "";
  const svcInput = h("input", {name: "service", value: service, placeholder: "any service", size: 16,
                               "aria-label": "service"});
  const statusSelect = h("select", {name: "status", "aria-label": "status"},
    [["", "any status"], ["2xx", "2xx"], ["3xx", "3xx"], ["4xx", "4xx"], ["5xx", "5xx"], ["error", "no response"]]
      .map(([v, label]) => h("option", {value: v, selected: v === status}, label)));
  const pause = h("button", {type: "button", id: "tail-pause"}, "Pause");
  const filters = h("form", {class: "filters", onsubmit: (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    if (svcInput.value.trim()) q.set("service", svcInput.value.trim());
    if (statusSelect.value) q.set("status", statusSelect.value);
    go("tail", "", q);
  }}, h("label", {}, "Service ", svcInput), " ", h("label", {}, "Status ", statusSelect), " ",
     h("button", {type: "submit"}, "Filter"), " ", pause);
  statusSelect.addEventListener("change", () => filters.requestSubmit());
  const state = h("div", {class: "tail-state"});
  const rows = h("tbody", {});
  main.append(h("div", {class: "view-head"}, h("h1", {}, "Live tail"), filters), state,
    h("table", {class: "tail"}, h("thead", {}, h("tr", {}, ["time (UTC)", "seen by", "caller", "callee", "method",
      "path", "status", "duration", "mode", "action", "flags"].map((x) => h("th", {}, x)))), rows));

  const shown = new Map();  // key -> row, newest first in `rows`
  let newest = 0n, paused = false, timer = null, stopped = false;
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    if (paused) state.replaceChildren(message("info", `paused: ${shown.size} calls shown`));
    else poll();
  });

  async function poll() {
    clearTimeout(timer);
    if (stopped || paused) return;
    const after = newest > OVERLAP_NS ? newest - OVERLAP_NS : 0n;
    const q = new URLSearchParams({after: after.toString(), limit: String(ASK)});
    if (service) q.set("service", service);
    if (status) q.set("status", status);
    const got = await api("/v1/console/tail?" + q);
    if (stopped || paused) return;  // paused while it asked: the answer waits for Resume
    if (!got.ok) {
      state.replaceChildren(message("error", got.data.error));
    } else {
      add(got.data.calls);
      state.replaceChildren(message("info", `${shown.size} calls shown` + (service ? ` to or from ${service}` : "")
        + (status ? `, status ${status}` : "") + `; updated every ${POLL_MS / 1000} s`));
    }
    if (!got.ok && got.status === 400) return;  // a bad filter stays bad: no asking again
    timer = setTimeout(poll, POLL_MS);
  }

  function add(calls) {
    const fresh = [];
    for (const c of calls) {
      const key = [c.time_ns, c.observer_id, c.observer, c.caller, c.path, c.status].join(" ");
      if (shown.has(key)) continue;
      const t = BigInt(c.time_ns);
      if (t > newest) newest = t;
      const tr = row(c);
      tr.dataset.t = c.time_ns;
      tr.dataset.key = key;
      shown.set(key, tr);
      fresh.push(tr);
    }
    if (!fresh.length) return;
    const all = [...rows.children, ...fresh];
    all.sort((a, b) => {
      const x = BigInt(a.dataset.t), y = BigInt(b.dataset.t);
      return x === y ? 0 : x > y ? -1 : 1;
    });
    for (const extra of all.splice(KEEP)) shown.delete(extra.dataset.key);
    rows.replaceChildren(...all);
  }

  poll();
  return () => { stopped = true; clearTimeout(timer); };
}

function row(c) {
  const cls = c.error || c.status === 0 ? "st-error" : c.status >= 500 ? "st-5xx" : c.status >= 400 ? "st-4xx"
    : "st-ok";
  const ms = Number(BigInt(c.time_ns) / 1000000n);
  return h("tr", {class: "call " + cls},
    h("td", {class: "t"}, fmt.clock(ms)), h("td", {}, c.observer), h("td", {}, c.caller), h("td", {}, c.callee),
    h("td", {}, c.method), h("td", {class: "path"}, c.path), h("td", {class: "status"}, c.status ? String(c.status) : "–"),
    h("td", {}, fmt.ms(c.duration_ms)), h("td", {}, c.mode ? modeBadge(c.mode) : "–"), h("td", {}, c.action || ""),
    h("td", {}, [c.response_flags, c.error].filter(Boolean).join(" ")));
}
