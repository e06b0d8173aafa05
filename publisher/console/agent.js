// One agent's history (GET /v1/agents/{id}): its latest state and every event it reported,
// newest at the top of the timeline. Heartbeats are liveness, not history: last seen shows them.

import { ApiError, get } from "./api.js";
import { ago, clear, el, stateTag, tone, utc } from "./states.js";

function detail(name, value) {
  return el("div", {}, el("dt", {}, name), el("dd", {}, value));
}

export async function openAgent(drawer, agentId) {
  drawer.hidden = false;
  const close = el("button", { type: "button", dataset: { action: "close-agent" }, onclick: () => { drawer.hidden = true; } }, "Close");
  clear(drawer, el("header", {}, el("h2", {}, agentId), close), el("p", { class: "muted" }, "Loading…"));
  close.focus();
  let body;
  try {
    ({ body } = await get(`/v1/agents/${encodeURIComponent(agentId)}`));
  } catch (err) {
    clear(drawer, el("header", {}, el("h2", {}, agentId), close),
      el("p", { class: "error" }, err instanceof ApiError ? `${err.status} ${err.code}: ${err.message}` : String(err)));
    return;
  }
  const a = body.agent;
  const events = [...body.events].reverse();
  const timeline = el("ol", { class: "timeline", dataset: { role: "history" } }, events.map((e) =>
    el("li", { class: `tone-${tone(e.state)}`, dataset: { state: e.state } },
      el("div", { class: "what" }, stateTag(e.state), " ", `${e.version}${e.target_version ? ` → ${e.target_version}` : ""}`),
      el("div", { class: "when" }, `${utc(e.received)} · ${ago(e.received)} (agent clock ${e.time})`),
      e.error || e.failed_state ? el("div", { class: "err" }, [e.failed_state, e.error].filter(Boolean).join(": ")) : null)));
  clear(drawer,
    el("header", {}, el("h2", {}, a.agent_id), close),
    el("dl", { class: "facts" },
      detail("State", stateTag(a.state)),
      detail("Version", `${a.version}${a.target_version ? ` (target ${a.target_version})` : ""}`),
      detail("Mode", `${a.mode} · ${a.platform || "-"}`),
      detail("Last seen", el("span", { class: a.stale ? "tone-stale" : "" }, `${ago(a.last_seen)}${a.stale ? " · silent" : ""}`)),
      detail("Last change", ago(a.last_change)),
      detail("Last result", a.last_result || "-"),
      a.update_available ? detail("Update", el("span", { class: "tone-warn" }, `${a.target_version}${a.image ? ` (${a.image})` : ""}`)) : null,
      a.last_error ? detail("Last error", el("span", { class: "tone-bad" }, a.last_error)) : null),
    el("h3", {}, `History (${events.length} event${events.length === 1 ? "" : "s"}, newest first)`),
    events.length ? timeline : el("p", { class: "empty" }, "No events stored (only heartbeats, or older than the retention)."));
}
