// A service's page: its mode (and the form that switches it: a reason, a confirmation naming what changes, the
// answer shown as the API gives it), its sidecars, the policies naming it, its history; its traffic (traffic.js).
import {api, card, fmt, h, message, modeBadge, table} from "./core.js";
import {renderTraffic} from "./traffic.js";

const MODES = ["observe", "dry-run", "enforce"];
const WHAT = {
  "observe": "its calls pass untouched and are recorded; no policy is evaluated",
  "dry-run": "every policy for it is evaluated on every call and what it would have done is recorded "
             + "(would_…); its traffic is not changed",
  "enforce": "its policies are applied to its calls: timeouts, retries, ejections, denials and limits take effect",
};

export async function renderService(main, route, go) {
  const name = route.arg;
  const win = route.query.get("window") || "15m";
  main.append(h("p", {class: "crumbs"}, h("a", {href: "#/map"}, "Service map"), " / ", name || "?"));
  if (!name) {
    main.append(message("error", "no service named: the page is #/service/NAME"));
    return;
  }
  const got = await api("/v1/console/services/" + encodeURIComponent(name));
  if (!got.ok) {
    main.append(message("error", got.data.error), h("p", {}, h("a", {href: "#/map"}, "Back to the service map")));
    return;
  }
  const svc = got.data;
  const badge = h("span", {id: "mode-now"}, modeBadge(svc.mode));
  main.append(h("div", {class: "view-head"}, h("h1", {}, svc.name, " ", badge),
                h("span", {class: "muted"}, "namespace " + svc.namespace)));
  const history = h("div", {id: "history"});
  const sidecars = h("div", {id: "sidecars"}, sidecarTable(svc.sidecars));
  const refresh = async () => {
    const now = await api("/v1/console/services/" + encodeURIComponent(name));
    if (now.ok) {
      badge.replaceChildren(modeBadge(now.data.mode));
      sidecars.replaceChildren(sidecarTable(now.data.sidecars));
    }
    await showHistory(history, name);
  };
  const grid = h("div", {class: "grid"});
  grid.append(card("Mode", modeForm(svc, refresh)),
              card("Sidecars", sidecars, instanceList(svc.instances)));
  main.append(grid);
  main.append(h("div", {class: "grid"}, card("History", history),
                card("Policies naming " + name, policyList(svc.policies))));
  const traffic = h("div", {id: "traffic"});
  main.append(traffic);
  await showHistory(history, name);
  await renderTraffic(traffic, name, win, (w) => go("service", name, new URLSearchParams({window: w})));
  // sidecars report the mode they apply within a poll: show it as it comes
  const timer = setInterval(async () => {
    const now = await api("/v1/console/services/" + encodeURIComponent(name));
    if (now.ok) sidecars.replaceChildren(sidecarTable(now.data.sidecars));
  }, 3000);
  return () => clearInterval(timer);
}

function modeForm(svc, refresh) {
  const answer = h("div", {class: "answer", id: "mode-answer"});
  const confirm = h("div", {class: "confirm", id: "mode-confirm", hidden: true});
  const reason = h("textarea", {name: "reason", id: "mode-reason", rows: 2, maxlength: 2000,
                                placeholder: "why: it goes into the history with your name"});
  const choices = MODES.map((m) => h("label", {class: "choice"},
    h("input", {type: "radio", name: "mode", value: m, checked: m === svc.mode}), " ", m));
  // enforce may be guarded: the control plane switches it back to dry-run by itself if it makes calls worse
  const guarded = h("input", {type: "checkbox", id: "mode-guard", name: "guard"});
  const guardWindow = h("input", {type: "text", id: "mode-guard-window", name: "guard-window", value: "5m",
                                  size: 6, "aria-label": "guard window"});
  const guard = h("p", {class: "guard", id: "mode-guard-line"},
    h("label", {}, guarded, " guarded: back to dry-run by itself if enforce makes the calls worse, within "),
    guardWindow);
  const form = h("form", {id: "mode-form", class: "mode-form", novalidate: true},
    h("fieldset", {}, h("legend", {}, "Switch to"), choices), guard,
    h("label", {for: "mode-reason"}, "Reason"), reason,
    h("button", {type: "submit"}, "Review the change…"));
  const showGuard = () => {
    guard.hidden = form.querySelector("input[name=mode]:checked")?.value !== "enforce";
  };
  form.addEventListener("change", showGuard);
  showGuard();
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    answer.replaceChildren();
    const mode = form.querySelector("input[name=mode]:checked")?.value;
    const why = reason.value.trim();
    if (!mode) return answer.append(message("error", "choose a mode: observe, dry-run or enforce"));
    if (mode === svc.mode) return answer.append(message("error", `${svc.name} is in ${mode} already`));
    if (!why) return answer.append(message("error", "a reason is required: say why, for the history"));
    const window = mode === "enforce" && guarded.checked ? guardWindow.value.trim() : "";
    if (mode === "enforce" && guarded.checked && !window) {
      return answer.append(message("error", "a guard needs a window, e.g. 5m"));
    }
    confirm.replaceChildren(
      h("p", {}, "Switch ", h("strong", {}, svc.name), " from ", modeBadge(svc.mode), " to ", modeBadge(mode), "?"),
      h("p", {class: "muted"}, "In " + mode + ", " + WHAT[mode] + ". Its callers' sidecars and its own apply "
                               + "this on their next poll."),
      window ? h("p", {}, "Guarded for " + window + ": judged against its dry-run calls of the " + window
                          + " before, and switched back to dry-run by the control plane if worse.") : "",
      h("p", {}, "Reason: ", h("q", {}, why)),
      h("button", {type: "button", class: "primary", id: "mode-apply", onclick: () => apply(mode, why, window)},
        `Switch ${svc.name} to ${mode}`), " ",
      h("button", {type: "button", onclick: () => { confirm.hidden = true; }}, "Cancel"));
    confirm.hidden = false;
  });
  async function apply(mode, why, window) {
    confirm.hidden = true;
    const body = window ? {mode, reason: why, guard: {window}} : {mode, reason: why};
    const got = await api("/v1/modes/" + encodeURIComponent(svc.name), {method: "PUT", body});
    if (got.ok) {
      const guardText = got.data.guard ? `; guarded for ${window}` : "";
      answer.replaceChildren(message("ok", `${svc.name} is now in ${got.data.mode} (revision ${got.data.revision}, `
                                           + `${got.data.action}${guardText})`));
      reason.value = "";
      svc.mode = got.data.mode;
      now.replaceChildren(...nowLine());
      await refresh();
    } else {
      answer.replaceChildren(message("error", `refused (${got.status}): ${got.data.error}`));
    }
  }
  const nowLine = () => ["Now ", modeBadge(svc.mode), ": ", WHAT[svc.mode] || ""];
  const now = h("p", {id: "mode-line"}, nowLine());
  return [now, form, confirm, answer];
}

function sidecarTable(list) {
  if (!list.length) return h("p", {class: "muted"}, "No sidecar of this service follows the control plane.");
  return table(["instance", "state", "applied revision", "mode applied", "last heard"],
    list.map((x) => [x.instance, h("span", {class: "state-" + x.state}, x.state + (x.error ? ": " + x.error : "")),
                     x.applied_version || "–", x.mode ? modeBadge(x.mode) : "–", fmt.time(x.last_seen)]),
    {class: "sidecars"});
}

function instanceList(instances) {
  if (!instances.length) return h("p", {class: "muted"}, "No instances in the mesh definition.");
  return h("p", {class: "muted"}, "Instances: ", instances.map((i, n) => [n ? ", " : "", i.address,
    Object.keys(i.labels).length ? " (" + Object.entries(i.labels).map(([k, v]) => k + "=" + v).join(", ") + ")" : ""]));
}

function policyList(policies) {
  if (!policies.length) return h("p", {class: "muted"}, "No VirtualService, DestinationRule, PeerAuthentication, "
                                                        + "AuthorizationPolicy or LocalRateLimit names it.");
  return policies.map((p) => h("details", {class: "policy"},
    h("summary", {}, h("strong", {}, p.kind), " " + p.name + " — " + p.why, h("span", {class: "muted"},
      " (revision " + p.revision + ")")),
    h("pre", {}, p.yaml)));
}

async function showHistory(el, name) {
  const got = await api("/v1/history?" + new URLSearchParams({service: name, limit: "50"}));
  if (!got.ok) return el.replaceChildren(message("error", got.data.error));
  const entries = got.data.entries.slice().reverse();
  if (!entries.length) return el.replaceChildren(h("p", {class: "muted"}, "No change names this service yet."));
  el.replaceChildren(table(["revision", "when", "who", "change", "reason"], entries.map((e) => [
    String(e.revision), fmt.time(e.time), e.who, change(e), e.reason || h("span", {class: "muted"}, "(none given)")]),
    {class: "history"}));
}

function change(e) {
  const what = e.kind + " " + e.name;
  if (e.kind === "Mode") {
    const to = e.after?.spec?.mode || "observe";
    if (!e.before) return [h("span", {}, "mode set: "), modeBadge(to)];  // observe until then, by default
    return [h("span", {}, "mode "), modeBadge(e.before.spec.mode), " → ", modeBadge(to),
            e.action === "deleted" ? " (deleted)" : ""];
  }
  return what + " " + e.action;
}
