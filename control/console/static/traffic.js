// A service's traffic on its page: its edges, its recommendations (each with its evidence and the what-if of its
// policy), its mTLS readiness and, when the control plane has one, its dry-run report. Read from the recorded calls,
// which may be slow or away: the rest of the page does not wait for it, and a failure is one line here.
import {api, card, fmt, h, message, table, windowForm} from "./core.js";
import {renderDryRun} from "./dryrun.js";

export async function renderTraffic(el, name, win, onWindow) {
  const head = h("div", {class: "view-head"}, h("h2", {}, "Traffic"), windowForm(win, onWindow));
  const body = h("div", {}, h("p", {class: "loading"}, "Reading the recorded calls…"));
  el.replaceChildren(card("", head, body));
  const got = await api(`/v1/console/services/${encodeURIComponent(name)}/traffic?` + new URLSearchParams({window: win}));
  if (!got.ok) return body.replaceChildren(message("error", got.data.error));
  const t = got.data;
  body.replaceChildren(message(t.calls.state === "ok" ? "info" : "warn", t.calls.message));
  if (t.calls.state !== "ok") return;
  body.append(table(["caller", "callee", "protocol", "seen by", "calls", "rate", "errors", "p50", "p99", "p99.9"],
    t.edges.map((e) => [e.caller, e.callee, e.protocol, e.observer, fmt.count(e.n), fmt.rate(e.rate_per_s),
                        fmt.pct(e.error_rate), fmt.ms(e.p50_ms), fmt.ms(e.p99_ms), fmt.ms(e.p999_ms)]),
    {class: "edges"}));
  const change = t.recommendations.filter((r) => r.policy), none = t.recommendations.filter((r) => !r.policy);
  el.append(card(`Recommendations (${change.length} of ${t.recommendations.length} recommend a change)`,
    change.length ? change.map(recommendation) : h("p", {class: "muted"}, "No change recommended for this window."),
    none.length ? h("details", {class: "no-change"}, h("summary", {}, `${none.length} with no change (why, for each)`),
                    none.map(recommendation)) : null));
  el.append(card("mTLS readiness", readiness(t.readiness)));
  if (t.dryrun !== undefined) el.append(card("Dry-run report", renderDryRun(t.dryrun)));
}

function target(t) {
  return [t.caller, t.callee].filter(Boolean).join(" → ") + (t.method ? " " + t.method : "")
         + (t.route ? " " + t.route : "");
}

function recommendation(r) {
  const ev = r.evidence;
  return h("article", {class: "rec" + (r.policy ? " rec-change" : " rec-none"), "data-kind": r.kind},
    h("header", {}, h("span", {class: "tag"}, r.kind), " ", h("span", {class: "target"}, target(r.target)), " ",
      h("strong", {}, r.policy ? r.summary : "no change"), " ",
      h("span", {class: "conf conf-" + ev.confidence}, "confidence " + ev.confidence), " ",
      h("span", {class: "muted"}, "n=" + fmt.count(ev.n))),
    h("p", {}, ev.reason),
    r.whatif && r.whatif.says ? h("p", {class: "whatif"}, h("strong", {}, "What if: "), r.whatif.says) : null,
    r.warnings.length ? h("ul", {class: "warnings"}, r.warnings.map((w) => h("li", {}, w))) : null,
    h("details", {}, h("summary", {}, "Evidence (" + ev.window + ")"), figures(ev.figures)));
}

export function figures(obj) {
  const rows = Object.entries(obj || {}).map(([k, v]) => [k, typeof v === "object" && v !== null
    ? h("code", {}, JSON.stringify(v)) : fmt.any(v)]);
  return rows.length ? table(["figure", "value"], rows, {class: "figures"}) : h("p", {class: "muted"}, "no figures");
}

function readiness(r) {
  if (!r) return h("p", {class: "muted"}, "No inbound calls to judge by in this window.");
  return [
    h("p", {}, "Verdict: ", h("strong", {class: "verdict"}, r.verdict)),
    table(["caller", "calls", "mTLS", "plaintext", "sidecar", "seen by", "last plaintext"],
      r.callers.map((c) => [c.caller, fmt.count(c.calls), fmt.count(c.mtls), fmt.count(c.plaintext),
                            c.sidecar ? "yes" : h("span", {class: "tag tag-unmeshed"}, "no sidecar"), c.seen_by,
                            c.last_plaintext || "–"])),
    r.would_break.length ? h("p", {class: "warn"}, "STRICT would refuse: " + r.would_break.join(", "))
      : h("p", {}, "STRICT would refuse no caller of this window."),
    h("ol", {class: "steps"}, r.steps.map((x) => h("li", {}, x))),
  ];
}
