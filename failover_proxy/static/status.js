// Live status: fetch /status every second and redraw; charts from /status/history; buttons
// for the operator's levers. No framework, no CDN.
"use strict";

const REFRESH_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
let history = { upstreams: {} };
let historyFetchedAt = 0;
let tokenRequired = false;

function element(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function percent(share) {
  return `${(share * 100).toFixed(share > 0 && share < 0.1 ? 1 : 0)}%`;
}

function backendItem(name, backend) {
  const facts = [
    backend.region, `weight ${backend.weight}`, `${percent(backend.traffic_share)} of traffic`,
    `${backend.in_flight} in flight`, `${backend.ewma_latency_ms.toFixed(1)} ms`,
  ];
  if (backend.capacity_rps) facts.push(`capacity ${backend.capacity_rps} req/s`);
  if (backend.last_check && backend.last_check.result) facts.push(`check ${backend.last_check.result}`);
  return element("li", {
    class: `backend state-${backend.state}`, "data-backend": name, "data-state": backend.state,
    title: backend.url,
  },
    element("span", { class: "name" }, name), " ",
    element("span", { class: "state-label" }, backend.state), " ",
    leverButton(backend.state === "draining" ? "undrain" : "drain",
      `/backends/${enc(backend.upstream)}/${enc(name)}/${backend.state === "draining" ? "undrain" : "drain"}`,
      `${backend.state === "draining" ? "undrain" : "drain"} ${name}`),
    element("div", { class: "facts" }, facts.filter(Boolean).join(" · ")),
    backend.reason ? element("div", { class: "reason" }, backend.reason) : "",
  );
}

function regionList(provider) {
  // A region of a provider is a failure domain of its own: show each named one's state.
  const named = Object.entries(provider.regions || {}).filter(([region]) => region);
  if (!named.length) return "";
  return element("ul", { class: "regions" }, ...named.map(([region, state]) => element("li", {
    class: `region state-${state.state}`, "data-region": region, "data-state": state.state,
    title: state.reason || `${state.backends.length} backends`,
  }, `${region} ${state.state} · ${percent(state.traffic_share)}`)));
}

function providerCard(upstreamName, name, provider) {
  const bar = element("div", { class: "share" }, element("div", { style: `width: ${percent(provider.traffic_share)}` }));
  const list = element("ul", { class: "backends" });
  for (const [backendName, backend] of Object.entries(provider.backends)) {
    list.append(backendItem(backendName, { ...backend, upstream: upstreamName }));
  }
  const action = provider.forced_down ? "restore" : "force-down";
  const lever = leverButton(provider.forced_down ? "restore" : "force down",
    `/providers/${enc(upstreamName)}/${enc(name)}/${action}`,
    `${provider.forced_down ? "restore" : "force down"} ${name} for ${upstreamName}`);
  return element("div", {
    class: `provider state-${provider.state}`, "data-upstream": upstreamName,
    "data-provider": name, "data-state": provider.state,
  },
    element("h3", {}, element("span", {}, name), element("span", { class: "state-label" }, provider.state)),
    bar,
    charts((history.upstreams[upstreamName] || {})[name] || []),
    lever,
    element("div", { class: "muted" }, `${percent(provider.traffic_share)} of new requests`),
    element("div", { class: "reason" }, provider.reason || ""),
    regionList(provider),
    list,
  );
}

function upstreamCard(name, upstream) {
  const providers = element("div", { class: "providers" });
  for (const [providerName, provider] of Object.entries(upstream.providers)) {
    providers.append(providerCard(name, providerName, provider));
  }
  const notes = [`${upstream.strategy} policy`, `${upstream.active_requests} in flight`];
  if (upstream.panic) notes.push("PANIC: health ignored");
  if (upstream.requests_shed) notes.push(`${upstream.requests_shed} shed at capacity`);
  return element("article", { class: "upstream", "data-upstream": name },
    element("h2", {}, name, " ", element("span", { class: "muted" }, notes.join(" · "))),
    providers,
  );
}

// -- charts: request rate, 5xx share and p99 over the last 15 minutes ------------------------------

function sparkline(points, value) {
  const width = 120, height = 28;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const values = points.map(value);
  const max = Math.max(...values.filter((v) => v !== null), 0) || 1;
  const now = Date.now() / 1000;
  const span = history.window_s || 900;
  let segment = [];
  const segments = [segment];
  points.forEach((point, index) => {
    if (values[index] === null) { segment = []; segments.push(segment); return; }
    const x = width - ((now - point.at) / span) * width;
    const y = height - 2 - (values[index] / max) * (height - 4);
    segment.push(`${Math.max(0, x).toFixed(1)},${y.toFixed(1)}`);
  });
  for (const line of segments.filter((s) => s.length)) {
    const polyline = document.createElementNS(SVG, "polyline");
    polyline.setAttribute("points", (line.length === 1 ? [line[0], line[0]] : line).join(" "));
    svg.append(polyline);
  }
  return svg;
}

function lastValue(points, value) {
  for (let i = points.length - 1; i >= 0; i--) if (value(points[i]) !== null) return value(points[i]);
  return null;
}

function charts(points) {
  const series = [
    ["rps", "req/s", (p) => p.rps, (v) => v.toFixed(v < 10 ? 1 : 0)],
    ["errors", "5xx", (p) => p.error_ratio, (v) => `${(v * 100).toFixed(1)}%`],
    ["p99", "p99", (p) => p.p99_ms, (v) => `${v.toFixed(v < 10 ? 1 : 0)} ms`],
  ];
  return element("div", { class: "charts", "data-points": points.length },
    ...series.map(([key, label, value, format]) => {
      const last = lastValue(points, value);
      return element("figure", { class: `chart chart-${key}` },
        sparkline(points, value),
        element("figcaption", {}, `${label} ${last === null ? "–" : format(last)}`));
    }));
}

// -- levers: force down / restore a provider, drain / undrain a backend ------------------------------

function enc(name) { return encodeURIComponent(name); }

function leverButton(label, path, what) {
  const button = element("button", { class: "lever", type: "button", "data-path": path }, label);
  // The dialog opens after the click returns, so a redraw never swallows it.
  button.addEventListener("click", () => setTimeout(() => pull(path, what), 0));
  return button;
}

function notice(text, failed) {
  const shown = document.getElementById("notice");
  shown.textContent = text;
  shown.className = failed ? "failed" : "done";
}

async function pull(path, what) {
  // Ask for the token (kept for this tab once it worked); without one, ask to confirm.
  let token = sessionStorage.getItem("adminToken") || "";
  if (tokenRequired && !token) {
    token = window.prompt(`Admin token to ${what}:`);
    if (token === null) return;
  } else if (!tokenRequired && !window.confirm(`${what}?`)) {
    return;
  }
  const response = await fetch(path, {
    method: "POST", headers: token ? { Authorization: `Bearer ${token}` } : {},
  });
  if (response.status === 401 || response.status === 403) {
    sessionStorage.removeItem("adminToken");
    notice(`${what}: refused, wrong token`, true);
    return;
  }
  if (!response.ok) {
    notice(`${what}: ${response.status} ${await response.text()}`, true);
    return;
  }
  if (token) sessionStorage.setItem("adminToken", token);
  notice(`${what}: done`, false);
}

function eventItem(event) {
  const when = new Date(event.at * 1000).toLocaleTimeString();
  const where = event.to.length ? event.to.join(", ") : "nobody";
  const text = event.kind === "failover"
    ? `${when} ${event.upstream}: ${event.provider} left rotation, traffic to ${where} (${event.reason})`
    : `${when} ${event.upstream}: ${event.provider} back in rotation`;
  return element("li", { class: event.kind }, text);
}

function render(status) {
  tokenRequired = status.token_required;
  const readiness = document.getElementById("readiness");
  readiness.textContent = status.ready ? "ready" : `not ready: ${status.ready_reason}`;
  readiness.className = `badge ${status.ready ? "ready" : "not-ready"}`;
  document.getElementById("generation").textContent = `config generation ${status.generation}`;
  document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  const upstreams = document.getElementById("upstreams");
  upstreams.replaceChildren(...Object.entries(status.upstreams).map(([n, u]) => upstreamCard(n, u)));
  const events = document.getElementById("events");
  events.replaceChildren(...(status.recent_failovers.length
    ? status.recent_failovers.map(eventItem)
    : [element("li", { class: "muted" }, "none yet")]));
}

async function refresh() {
  try {
    const every = Math.min(5000, (history.interval_s || 1) * 1000);
    if (Date.now() - historyFetchedAt >= every) {
      const answer = await fetch("/status/history", { cache: "no-store" });
      history = await answer.json();
      historyFetchedAt = Date.now();
    }
    const response = await fetch("/status", { cache: "no-store" });
    render(await response.json());
  } catch (error) {
    const readiness = document.getElementById("readiness");
    readiness.textContent = `status unavailable: ${error}`;
    readiness.className = "badge not-ready";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
