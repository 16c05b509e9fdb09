// Live status: fetch /status every second and redraw. No framework, no CDN.
"use strict";

const REFRESH_MS = 1000;

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
  if (backend.last_check && backend.last_check.result) facts.push(`check ${backend.last_check.result}`);
  return element("li", {
    class: `backend state-${backend.state}`, "data-backend": name, "data-state": backend.state,
    title: backend.url,
  },
    element("span", { class: "name" }, name), " ",
    element("span", { class: "state-label" }, backend.state), " ",
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
    list.append(backendItem(backendName, backend));
  }
  return element("div", {
    class: `provider state-${provider.state}`, "data-upstream": upstreamName,
    "data-provider": name, "data-state": provider.state,
  },
    element("h3", {}, element("span", {}, name), element("span", { class: "state-label" }, provider.state)),
    bar,
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
  return element("article", { class: "upstream", "data-upstream": name },
    element("h2", {}, name, " ", element("span", { class: "muted" }, notes.join(" · "))),
    providers,
  );
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
