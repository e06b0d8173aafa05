// The agents table: filterable by version, state, mode, silence and update; a click on a row opens
// the agent's history. Pages come from /v1/fleet (cursor); loading more pauses the live refresh of
// the table until the operator goes back to the first page.

import { ago, clear, el, stateTag, TONES } from "./states.js";

const COLUMNS = ["Agent", "Mode", "Version", "State", "Target", "Last seen", "Changed", "Update", "Last error / result"];

export const FILTERS = ["version", "state", "mode", "stale", "update_available"];

function select(name, label, options, value, onChange) {
  const node = el("select", { name, dataset: { filter: name }, onchange: (e) => onChange(name, e.target.value) },
    el("option", { value: "" }, "any"),
    options.map((o) => el("option", { value: o, selected: o === value }, o)));
  return el("label", {}, label, node);
}

function check(name, label, value, onChange) {
  return el("label", {}, el("input", {
    type: "checkbox", dataset: { filter: name }, checked: value === "true",
    onchange: (e) => onChange(name, e.target.checked ? "true" : ""),
  }), label);
}

function row(agent, onAgent) {
  const seen = agent.stale
    ? el("span", { class: "tone-stale" }, `${ago(agent.last_seen)} · silent`)
    : ago(agent.last_seen);
  const err = agent.last_error
    ? el("td", { class: "err" }, agent.last_error)
    : el("td", { class: "muted wrap" }, agent.last_result || "");
  return el("tr", {
    tabindex: 0, dataset: { agentId: agent.agent_id },
    onclick: () => onAgent(agent.agent_id),
    onkeydown: (e) => { if (e.key === "Enter") onAgent(agent.agent_id); },
  },
  el("td", { class: "mono agent" }, agent.agent_id),
  el("td", {}, agent.mode),
  el("td", {}, agent.version),
  el("td", {}, stateTag(agent.state)),
  el("td", { class: "muted" }, agent.target_version || "-"),
  el("td", {}, seen),
  el("td", { class: "muted" }, ago(agent.last_change)),
  el("td", {}, agent.update_available ? updateCell(agent) : ""),
  err);
}

// Containers: the image to roll (its last path part; the whole reference on hover).
function updateCell(agent) {
  if (agent.mode === "container" && agent.image) {
    const short = agent.image.split("/").pop();
    return el("span", { class: "tone-warn mono", title: agent.image }, `→ ${short}`);
  }
  return el("span", { class: "tone-warn" }, "available");
}

export function renderTable(node, state, handlers) {
  const { agents, filters, summary, next, paused, total } = state;
  const states = [...new Set([...Object.keys(summary.by_state), ...Object.keys(TONES)])].filter((s) => s !== "-");
  const bar = el("div", { class: "filters", dataset: { role: "filters" } },
    select("version", "Version", Object.keys(summary.by_version), filters.version, handlers.onFilter),
    select("state", "State", states, filters.state, handlers.onFilter),
    select("mode", "Mode", ["vm", "container"], filters.mode, handlers.onFilter),
    check("stale", "silent only", filters.stale, handlers.onFilter),
    check("update_available", "update available", filters.update_available, handlers.onFilter),
    FILTERS.some((f) => filters[f]) ? el("button", { type: "button", class: "link", dataset: { action: "clear-filters" }, onclick: handlers.onClear }, "clear filters") : null);
  const body = el("tbody", {}, agents.map((a) => row(a, handlers.onAgent)));
  const table = agents.length
    ? el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, el("tr", {}, COLUMNS.map((c) => el("th", {}, c)))), body))
    : el("p", { class: "empty" }, "No agent matches these filters.");
  const foot = el("div", { class: "table-foot" },
    el("span", {}, `${agents.length.toLocaleString("en")} shown of ${total.toLocaleString("en")} agents`),
    next ? el("button", { type: "button", dataset: { action: "more" }, onclick: handlers.onMore }, "Load more") : null,
    paused ? el("button", { type: "button", class: "link", onclick: handlers.onLive }, "back to the live first page") : null);
  clear(node, el("h2", {}, "Agents", el("span", { class: "count" }, total.toLocaleString("en"))), bar, table, foot);
}
