// The service map: services in columns by depth (callers left of their callees), each edge with its rate, error
// rate and p99 as one observer saw it (the analysis' rule), unmeshed callers drawn apart; each service a link.
import {api, card, fmt, h, message, modeBadge, s, table, windowForm} from "./core.js";

const NODE_W = 176, NODE_H = 50, GAP_X = 210, GAP_Y = 34, PAD = 24;

export async function renderMap(main, route, go) {
  const win = route.query.get("window") || "15m";
  const head = h("div", {class: "view-head"}, h("h1", {}, "Service map"),
    windowForm(win, (w) => go("map", "", new URLSearchParams({window: w}))));
  main.append(head);
  const got = await api("/v1/console/map?" + new URLSearchParams({window: win}));
  if (!got.ok) {
    main.append(message("error", got.data.error));
    return;
  }
  const m = got.data;
  main.append(message(m.calls.state === "ok" ? "info" : "warn", m.calls.message), legend());
  const linked = new Set(m.services.filter((x) => x.in_mesh).map((x) => x.name));
  const busy = new Set(m.edges.flatMap((e) => [e.caller, e.callee]));
  if (m.edges.length) main.append(h("div", {class: "map-wrap"}, draw(m.services.filter((x) => busy.has(x.name)),
                                                                    m.edges, linked)));
  const idle = m.services.filter((x) => !busy.has(x.name));
  if (idle.length) {
    main.append(h("p", {class: "idle"}, "No calls in the window: ",
      idle.map((x) => [h("a", {href: "#/service/" + encodeURIComponent(x.name), class: "chip"}, x.name,
                             " ", modeBadge(x.mode)), " "])));
  }
  if (m.edges.length) main.append(card("Edges", edgeTable(m.edges, linked)));
}

function legend() {
  return h("p", {class: "legend"},
    h("span", {class: "key key-meshed"}, "service with a sidecar"), " ",
    h("span", {class: "key key-unmeshed"}, "caller without a sidecar"), " ",
    h("span", {class: "key key-ok"}, "errors < 1%"), " ", h("span", {class: "key key-warn"}, "1–5%"), " ",
    h("span", {class: "key key-bad"}, "> 5%"));
}

function edgeLabel(e) {
  return fmt.rate(e.rate_per_s) + " · " + fmt.pct(e.error_rate) + " err · p99 " + fmt.ms(e.p99_ms);
}

function health(e) {
  return e.error_rate > 0.05 ? "bad" : e.error_rate > 0.01 ? "warn" : "ok";
}

function draw(services, edges, linked) {
  const columns = new Map();
  for (const x of services) {
    if (!columns.has(x.level)) columns.set(x.level, []);
    columns.get(x.level).push(x);
  }
  const levels = [...columns.keys()].sort((a, b) => a - b);
  const tallest = Math.max(...levels.map((l) => columns.get(l).length));
  const at = new Map();
  levels.forEach((l, col) => {
    const column = columns.get(l);
    const offset = (tallest - column.length) * (NODE_H + GAP_Y) / 2;
    column.forEach((x, row) => at.set(x.name, {x: PAD + col * (NODE_W + GAP_X),
                                               y: PAD + 18 + offset + row * (NODE_H + GAP_Y), svc: x}));
  });
  const width = PAD * 2 + levels.length * NODE_W + (levels.length - 1) * GAP_X;
  const height = PAD * 2 + 36 + tallest * NODE_H + (tallest - 1) * GAP_Y + 40;
  const svg = s("svg", {class: "map", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
                        "aria-label": "service map"},
    s("defs", {}, ["ok", "warn", "bad"].map((k) => s("marker", {id: "arrow-" + k, viewBox: "0 0 10 10", refX: 9,
      refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse", class: "arrow-" + k},
      s("path", {d: "M0,0 L10,5 L0,10 z"})))));
  const labels = s("g", {class: "edge-labels"});
  const drawn = edges.filter((e) => at.has(e.caller) && at.has(e.callee));
  const ports = spread(drawn, at);
  for (const e of drawn) {
    const a = at.get(e.caller), b = at.get(e.callee);
    const {d, mid} = path(a, b, ports.get(e));
    const cls = "edge edge-" + health(e) + (e.caller_meshed ? "" : " edge-unmeshed");
    svg.append(s("path", {d, class: cls, "marker-end": `url(#arrow-${health(e)})`},
                 s("title", {}, `${e.caller} → ${e.callee} (${e.protocol}): ${fmt.count(e.n)} calls seen by ${e.observer}, `
                                + `p50 ${fmt.ms(e.p50_ms)}, p99 ${fmt.ms(e.p99_ms)}`)));
    const text = edgeLabel(e);
    const w = text.length * 6.3 + 10;
    labels.append(s("g", {class: "edge-label", "data-edge": e.caller + "->" + e.callee},
      s("rect", {x: mid.x - w / 2, y: mid.y - 9, width: w, height: 18, rx: 4}),
      s("text", {x: mid.x, y: mid.y + 4, "text-anchor": "middle"}, text)));
  }
  for (const {x, y, svc} of at.values()) svg.append(node(x, y, svc, linked.has(svc.name)));
  svg.append(labels);
  return svg;
}

// Where each edge leaves its caller's box and enters its callee's: spread along the side, in the order of the boxes
// at the other end, so that edges into one service do not meet in one point.
function spread(edges, at) {
  const out = new Map(edges.map((e) => [e, {}]));
  const side = (key, other, end) => {
    const by = new Map();
    for (const e of edges) {
      if (!by.has(e[key])) by.set(e[key], []);
      by.get(e[key]).push(e);
    }
    for (const [name, list] of by) {
      list.sort((p, q) => at.get(p[other]).y - at.get(q[other]).y);
      list.forEach((e, i) => { out.get(e)[end] = at.get(name).y + NODE_H * (i + 1) / (list.length + 1); });
    }
  };
  side("caller", "callee", "y1");
  side("callee", "caller", "y2");
  return out;
}

function path(a, b, port) {
  const x1 = a.x + NODE_W, y1 = port.y1, x2 = b.x, y2 = port.y2;
  if (a === b) {  // a service calling itself: a loop over its box
    const cx = a.x + NODE_W / 2;
    return {d: `M${cx - 20},${a.y} C${cx - 40},${a.y - 40} ${cx + 40},${a.y - 40} ${cx + 20},${a.y}`,
            mid: {x: cx, y: a.y - 30}};
  }
  if (x2 > x1) {
    const dx = (x2 - x1) / 2;
    return {d: `M${x1},${y1} C${x1 + dx},${y1} ${x2 - dx},${y2} ${x2},${y2}`,
            mid: {x: (x1 + x2) / 2, y: (y1 + y2) / 2}};
  }
  // back to an earlier column (a cycle): under the boxes, bottom to bottom
  const sx = a.x + NODE_W / 2, sy = a.y + NODE_H, ex = b.x + NODE_W / 2, ey = b.y + NODE_H;
  const low = Math.max(sy, ey) + 40;
  return {d: `M${sx},${sy} C${sx},${low} ${ex},${low} ${ex},${ey}`, mid: {x: (sx + ex) / 2, y: low - 10}};
}

function node(x, y, svc, link) {
  const unmeshed = svc.caller && !svc.meshed;
  const cls = "node" + (unmeshed ? " node-unmeshed" : "") + (svc.in_mesh ? "" : " node-outside")
              + (svc.mode ? " node-" + svc.mode : "");
  const sub = unmeshed ? (svc.in_mesh ? "no sidecar · " + svc.mode : "no sidecar · not in the mesh")
    : svc.in_mesh ? svc.mode : "not in the mesh";
  const tip = svc.name + (svc.in_mesh ? ` (${svc.mode})` : " (not a service of the stored mesh)")
              + (unmeshed ? ": no sidecar recorded its calls" : "")
              + (svc.sidecars ? `; ${svc.sidecars} sidecar(s) following the control plane` : "");
  const g = s("g", {class: cls, "data-service": svc.name},
    s("title", {}, tip),
    s("rect", {x, y, width: NODE_W, height: NODE_H, rx: 8}),
    s("text", {x: x + 12, y: y + 21, class: "node-name"}, svc.name.length > 22 ? svc.name.slice(0, 21) + "…" : svc.name),
    s("text", {x: x + 12, y: y + 39, class: "node-sub"}, sub));
  return link ? s("a", {href: "#/service/" + encodeURIComponent(svc.name)}, g) : g;
}

function edgeTable(edges, linked) {
  const name = (n, meshed) => [linked.has(n) ? h("a", {href: "#/service/" + encodeURIComponent(n)}, n) : n,
                               meshed === false ? h("span", {class: "tag tag-unmeshed"}, "no sidecar") : null];
  return table(["caller", "callee", "protocol", "seen by", "calls", "rate", "errors", "p50", "p99", "p99.9",
                "tail confidence"],
    edges.map((e) => [name(e.caller, e.caller_meshed), name(e.callee), e.protocol, e.observer, fmt.count(e.n),
                      fmt.rate(e.rate_per_s), h("span", {class: "err-" + health(e)}, fmt.pct(e.error_rate)),
                      fmt.ms(e.p50_ms), fmt.ms(e.p99_ms), fmt.ms(e.p999_ms), e.confidence]),
    {class: "edges"});
}
