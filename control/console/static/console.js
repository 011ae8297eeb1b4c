// The console's one page: the token box, and the view the URL's fragment names (#/map, #/service/NAME, #/tail).
import {api, message, setToken, token} from "./core.js";
import {renderMap} from "./map.js";
import {renderService} from "./service.js";
import {renderTail} from "./tail.js";

const main = document.getElementById("main");
let leave = null;  // what the view shown needs to stop (the tail's polling) when another replaces it

// "#/service/api?window=1h" -> {view: "service", arg: "api", query: URLSearchParams}
function route() {
  const [path, q] = (location.hash.replace(/^#/, "") || "/map").split("?");
  const parts = path.split("/").filter(Boolean);
  let arg = "";
  try {
    arg = decodeURIComponent(parts.slice(1).join("/"));
  } catch (e) {
    arg = parts.slice(1).join("/");
  }
  return {view: parts[0] || "map", arg, query: new URLSearchParams(q || "")};
}

function go(view, arg, query) {
  const q = query && [...query.keys()].length ? "?" + query.toString() : "";
  const next = "#/" + view + (arg ? "/" + encodeURIComponent(arg) : "") + q;
  if (location.hash === next) show();  // the same view asked again (Apply, Filter): read it again
  else location.hash = next;
}

let shown = 0;  // which show() is the latest: an earlier one still waiting on the API draws into a detached element

async function show() {
  if (leave) leave();
  leave = null;
  const mine = ++shown;
  const r = route();
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === r.view);
  }
  const el = document.createElement("div");
  main.replaceChildren(el);
  const views = {map: renderMap, service: renderService, tail: renderTail};
  const view = views[r.view];
  if (!view) {
    el.append(message("error", "no such view " + JSON.stringify(r.view) + ": the console has #/map, "
                               + "#/service/NAME and #/tail"));
    return;
  }
  document.title = (r.arg || r.view) + " · meshlens";
  const stop = await view(el, r, go) || null;
  if (mine === shown) leave = stop;
  else if (stop) stop();  // replaced while it drew: its polling ends with it
}

// Who the page asks as: the token's name and role, or that this control plane takes no tokens.
async function whoami() {
  const who = document.getElementById("who");
  const got = await api("/v1/console/whoami");
  if (got.ok && !got.data.tokens) {
    who.textContent = "no tokens on this control plane (loopback only)";
    document.getElementById("token-form").classList.add("unneeded");
  } else if (got.ok) {
    who.textContent = "as " + got.data.name + " (" + got.data.role + ")";
  } else {
    who.textContent = token() ? got.data.error : "enter a token to read the mesh";
  }
  who.classList.toggle("bad", !got.ok);
}

document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = document.getElementById("token");
  setToken(input.value.trim());
  input.value = "";
  whoami();
  show();
});
document.getElementById("token-clear").addEventListener("click", () => {
  setToken("");
  whoami();
  show();
});
window.addEventListener("hashchange", show);
whoami();
show();
