// What needs a person: failures with their errors, agents that went silent, containers with an
// update available (and the image to roll). From the whole-fleet summary, not the table's page.

import { ago, clear, el } from "./states.js";

function agentButton(id, onAgent) {
  return el("button", { type: "button", class: "link agent-link", dataset: { agentId: id }, onclick: () => onAgent(id) }, id);
}

function panel(title, count, rows, emptyText, role) {
  const shown = rows.length;
  return el("section", { class: "panel", dataset: { role } },
    el("h2", {}, title, el("span", { class: "count" }, count.toLocaleString("en"))),
    shown ? el("ul", { class: "list" }, rows) : el("p", { class: "empty" }, emptyText),
    count > shown ? el("p", { class: "more-note" }, `${shown} shown; filter the table for all ${count.toLocaleString("en")}.`) : null);
}

export function renderAttention(node, summary, onAgent) {
  const a = summary.attention;
  const failures = a.failures.map((row) => el("li", {},
    agentButton(row.agent_id, onAgent),
    el("span", { class: "detail err" }, row.last_error || row.state),
    el("span", { class: "detail" }, `${row.version} → ${row.target_version || "-"} · ${row.state} ${ago(row.last_change)}`)));
  const silent = a.stale.map((row) => el("li", {},
    agentButton(row.agent_id, onAgent),
    el("span", { class: "detail tone-stale" }, `last seen ${ago(row.last_seen)}`),
    el("span", { class: "detail" }, `${row.mode} · ${row.version} · ${row.state}`)));
  const containers = a.update_available.map((row) => el("li", {},
    agentButton(row.agent_id, onAgent),
    el("span", { class: "detail mono" }, row.image || `(no image) ${row.target_version}`),
    el("span", { class: "detail" }, `runs ${row.version} · ${row.in_wave === false ? "not in the wave" : "in the wave"}`)));
  clear(node,
    panel("Failures", summary.failures, failures, "No agent failed or rolled back.", "failures"),
    panel("Silent agents", summary.stale, silent, "Every agent reported recently.", "silent"),
    panel("Containers to roll", summary.containers_to_roll, containers,
      "No container has an update waiting.", "containers"));
}
