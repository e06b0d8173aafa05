// The canary verdict for the live version (the `canary` command's rule, publisher/fleet.py):
// over attempts that ended; hold (too few) is never a pass.

import { clear, el } from "./states.js";

const VERDICT = {
  pass: ["ok", "PASS", "failure rate within the limit"],
  hold: ["warn", "HOLD", "too few ended attempts for a verdict"],
  fail: ["bad", "FAIL", "failure rate over the limit: halt or roll back"],
};

const pct = (x) => `${Math.round(x * 1000) / 10} %`;

export function renderCanary(node, canary, onAgent) {
  if (!canary) {
    clear(node, el("h2", {}, "Canary"), el("p", { class: "empty" }, "No live release."));
    return;
  }
  let [toneName, word, why] = VERDICT[canary.verdict] || ["idle", canary.verdict, ""];
  if (canary.verdict === "hold" && canary.ended > 0 && canary.failure_rate > canary.max_failure_rate) {
    // Too few for a verdict, but what has ended looks bad: say so, at 3 a.m. this matters.
    why = `too few ended attempts for a verdict, and ${pct(canary.failure_rate)} of them failed: look at the failures`;
    toneName = "bad";
  }
  const failures = canary.failures.slice(0, 5).map((f) => el("li", {},
    el("button", { type: "button", class: "link", dataset: { agentId: f.agent_id }, onclick: () => onAgent(f.agent_id) }, f.agent_id),
    el("span", { class: "muted" }, `: ${[f.failed_state, f.error].filter(Boolean).join(": ") || f.state}`)));
  clear(node,
    el("h2", {}, "Canary", el("span", { class: "count" }, canary.version)),
    el("div", { class: `verdict tone-${toneName}`, dataset: { field: "verdict" } }, word),
    el("div", { class: "muted" }, why),
    el("div", { class: "rate" }, `${pct(canary.failure_rate)} failed `, el("span", { class: "muted" }, `(limit ${pct(canary.max_failure_rate)})`)),
    el("div", {}, `${canary.ended} ended: ${canary.committed} committed, ${canary.failed} failed, ${canary.rolled_back} rolled back`),
    el("div", { class: "muted" }, `${canary.in_progress.length} still updating (not counted) · needs ${canary.min_agents} ended`),
    failures.length ? el("ul", {}, failures) : null);
}
