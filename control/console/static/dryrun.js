// A service's dry-run report (meshlens.analysis.dryrun): where dry-run and the what-if disagree first, in sentences,
// then the rest of the report as it comes, whatever its shape: lists of like records as tables, records as
// definition lists, values as text.
import {h, message} from "./core.js";

export function renderDryRun(report) {
  if (report === null) return h("p", {class: "muted"}, "No dry-run report for this window.");
  if (typeof report === "string") return message("warn", report);
  const {findings, ...rest} = report;
  return [
    Array.isArray(findings) && findings.length
      ? h("ul", {class: "findings"}, findings.map((f) => h("li", {}, typeof f === "string" ? f : JSON.stringify(f))))
      : h("p", {class: "muted"}, "No finding: what dry-run recorded agrees with the what-if."),
    value(rest, 0),
  ];
}

function value(v, depth) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "object") return String(v);
  if (depth > 4) return h("code", {}, JSON.stringify(v));
  if (Array.isArray(v)) {
    if (!v.length) return h("span", {class: "muted"}, "none");
    if (v.every((x) => x && typeof x === "object" && !Array.isArray(x))) {
      const keys = [...new Set(v.flatMap((x) => Object.keys(x)))];
      return h("table", {class: "figures"}, h("thead", {}, h("tr", {}, keys.map((k) => h("th", {}, k)))),
        h("tbody", {}, v.map((x) => h("tr", {}, keys.map((k) => h("td", {}, value(x[k], depth + 1)))))));
    }
    return h("ul", {}, v.map((x) => h("li", {}, value(x, depth + 1))));
  }
  return h("dl", {class: "report"}, Object.entries(v).map(([k, x]) => [h("dt", {}, k), h("dd", {}, value(x, depth + 1))]));
}
