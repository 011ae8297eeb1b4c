// A service's dry-run report (meshlens.analysis.dryrun): where dry-run and the what-if disagree, in sentences; the
// calls by mode (observe before, dry-run as it went, enforced as estimated, enforce as measured); what each policy
// would have done, with examples and what its recommendation expected. What the report holds beyond that is shown
// as it comes.
import {fmt, h, message, table} from "./core.js";

const KNOWN = ["service", "window", "findings", "observe", "dry_run", "estimated_enforce", "enforce", "refused",
               "policies"];

export function renderDryRun(report) {
  if (report === null || report === undefined) return h("p", {class: "muted"}, "No dry-run report.");
  if (typeof report === "string") return message("warn", report);
  const rows = [["observe (before)", report.observe], ["dry-run (as it went)", report.dry_run],
                ["enforced (estimated)", report.estimated_enforce], ["enforce (measured)", report.enforce]]
    .filter(([, f]) => f);
  const refused = Object.entries(report.refused || {}).filter(([, n]) => n);
  const rest = Object.fromEntries(Object.entries(report).filter(([k]) => !KNOWN.includes(k)));
  return [
    Array.isArray(report.findings) && report.findings.length
      ? h("ul", {class: "findings"}, report.findings.map((f) => h("li", {}, String(f))))
      : h("p", {class: "muted"}, "No finding: what dry-run recorded agrees with what was expected."),
    table(["calls", "n", "failed", "error rate (95% range)", "p50", "p99"], rows.map(([label, f]) => [
      label, fmt.count(f.n), fmt.count(f.failed),
      fmt.pct(f.error_rate) + (f.error_rate_lo !== undefined ? ` (${fmt.pct(f.error_rate_lo)}–${fmt.pct(f.error_rate_hi)})` : ""),
      fmt.ms(f.p50_s * 1000), fmt.ms(f.p99_s * 1000)]), {class: "modes"}),
    refused.length ? h("p", {}, "Enforced, it would also answer: "
                                + refused.map(([w, n]) => `${fmt.count(n)} ${w.replace("would_", "")}`).join(", ")) : null,
    (report.policies || []).length ? table(["policy would", "calls", "share", "of them failed", "expected"],
      report.policies.map((p) => [h("code", {}, p.word), fmt.count(p.n), fmt.pct(p.share), fmt.count(p.failed),
                                  expected(p.expected)]), {class: "policies"})
      : h("p", {class: "muted"}, "No policy would have acted on any call."),
    (report.policies || []).some((p) => (p.examples || []).length) ? h("details", {},
      h("summary", {}, "Example calls"),
      table(["policy would", "time", "caller", "method", "path", "status", "duration", "instance"],
        report.policies.flatMap((p) => (p.examples || []).map((e) => [p.word, e.time, e.caller, e.method, e.path,
          String(e.status), fmt.ms(e.duration_ms), e.instance])))) : null,
    Object.keys(rest).length ? value(rest, 0) : null,
  ];
}

function expected(e) {
  if (!e || !Object.keys(e).length) return "–";
  if ("cut_share" in e) return `${fmt.pct(e.cut_share)} of calls cut, ${e.cut_ok} of them successful`;
  if ("transient_failures" in e) return `${fmt.pct(e.transient_share)} transient failures, `
                                        + `~${fmt.pct(e.recovered_share)} of them recovered`;
  if ("ejections" in e) return `${e.ejections} ejection(s)`;
  return value(e, 0);
}

function value(v, depth) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "object") return fmt.any(v);
  if (depth > 3) return h("code", {}, JSON.stringify(v));
  if (Array.isArray(v)) return v.length ? h("ul", {}, v.map((x) => h("li", {}, value(x, depth + 1))))
    : h("span", {class: "muted"}, "none");
  return h("dl", {class: "report"}, Object.entries(v).map(([k, x]) => [h("dt", {}, k), h("dd", {}, value(x, depth + 1))]));
}
