// The fleet at a glance: agents, updates available, silent, failures; versions and states.
// A click on a tile or a chip filters the agents table to it.

import { clear, el, tone } from "./states.js";

function tile(n, what, toneName, filter, onFilter) {
  return el("div", {
    class: `tile${filter ? " clickable" : ""}`, dataset: { tile: what },
    onclick: filter ? () => onFilter(filter) : null, title: filter ? "show these agents" : null,
  }, el("div", { class: `n ${toneName && n ? `tone-${toneName}` : ""}` }, n.toLocaleString("en")), el("div", { class: "what" }, what));
}

export function renderSummary(node, summary, release, onFilter) {
  const live = release ? release.version : null;
  const versions = el("div", { class: "chips", dataset: { role: "versions" } },
    Object.entries(summary.by_version).map(([version, n]) =>
      el("span", { class: `chip${version === live ? " live" : ""}`, title: version === live ? "the live release" : null, onclick: () => onFilter({ version }) },
        el("span", {}, version || "-"), el("b", {}, n.toLocaleString("en")))));
  const states = el("div", { class: "chips", dataset: { role: "states" } },
    Object.entries(summary.by_state).map(([state, n]) =>
      el("span", { class: "chip", onclick: () => onFilter({ state }) },
        el("span", { class: `tone-${tone(state)}` }, state), el("b", {}, n.toLocaleString("en")))));
  const hours = Math.round(summary.stale_after_s / 360) / 10;
  clear(node,
    tile(summary.total, "agents", "", null, onFilter),
    tile(summary.update_available, "update available", "warn", { update_available: "true" }, onFilter),
    tile(summary.stale, `silent for ${hours} h+`, "stale", { stale: "true" }, onFilter),
    tile(summary.failures, "failed or rolled back", "bad", null, onFilter),
    el("div", { class: "tile" }, el("div", { class: "what" }, "Versions running"), versions),
    el("div", { class: "tile" }, el("div", { class: "what" }, "Latest states"), states));
}
