// The live release card: version, serial, rollout percent, expiry countdown, halted, and the
// rollout plan when the manifest carries one (DESIGN section 6: `progress` climbs it).

import { clear, clock, el, parseTime, span, utc } from "./states.js";

const WARN_EXPIRY_MS = 3 * 86400 * 1000;

export function expiryText(expires, now = Date.now()) {
  const t = parseTime(expires);
  if (t === null) return { text: "-", tone: "" };
  const left = t - now;
  if (left <= 0) return { text: `EXPIRED ${span(-left)} ago: agents refuse it; run refresh`, tone: "bad" };
  return { text: `in ${span(left)}`, tone: left < WARN_EXPIRY_MS ? "warn" : "" };
}

// The plan as a progress line: done steps, the current one highlighted, what comes next.
// next_at is the `progress` command's to compute; until it reports one, the soak counted from
// this serial's signed_at is what the manifest itself says.
function planView(release) {
  const plan = release.rollout_plan;
  const box = el("div", { class: "plan", dataset: { role: "rollout-plan" } },
    el("div", { class: "label" }, "Rollout plan"));
  if (!plan) {
    box.append(el("div", { class: "muted" }, "No plan in this release: the rollout moves when an operator moves it."));
    return box;
  }
  const current = release.rollout_percent;
  const list = el("ol");
  for (const step of plan.steps) {
    const state = step < current ? "done" : step === current ? "current" : "";
    list.append(el("li", { class: state }, el("span", { class: "step" }, `${step} %`)));
  }
  box.append(list);
  const next = plan.steps.find((s) => s > current);
  let line;
  if (release.halted) line = "halted: the plan waits until an operator resumes it (rollout N).";
  else if (next === undefined) line = "complete: the release is at its last step.";
  else {
    const signed = parseTime(release.signed_at);
    const soakMs = soakMillis(plan.soak);
    const at = signed !== null && soakMs !== null ? ` at ${clock(signed + soakMs)}` : "";
    line = `next: ${next} %${at} if healthy (soak ${plan.soak}, at most ${Math.round(Number(plan.max_failure_rate) * 1000) / 10} % failures, ${plan.min_agents} agents)`;
  }
  box.append(el("div", { class: "next" }, line));
  return box;
}

function soakMillis(text) {
  const m = /^((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?$/.exec(text || "");
  if (!m || !text) return null;
  const [d, h, mi, s] = [m[2], m[4], m[6], m[8]].map((x) => Number(x || 0));
  return (((d * 24 + h) * 60 + mi) * 60 + s) * 1000;
}

export function renderRelease(node, release, releaseError) {
  node.classList.toggle("halted", Boolean(release && release.halted));
  if (!release) {
    clear(node, el("h2", {}, "Live release"),
      el("p", { class: releaseError ? "error" : "empty" }, releaseError || "Nothing published yet."));
    return;
  }
  const expiry = expiryText(release.expires);
  const badges = [];
  if (release.halted) badges.push(el("span", { class: "badge bad", dataset: { field: "halted" } }, "Halted"));
  if (release.downgrade) badges.push(el("span", { class: "badge warn" }, "Downgrade"));
  if (release.verified === false) badges.push(el("span", { class: "badge bad" }, "Signature not trusted"));
  if (release.verified === true) badges.push(el("span", { class: "badge ok", title: "the live manifest verifies with the trusted keys" }, "Signature ok"));
  clear(node,
    el("h2", {}, "Live release"),
    el("div", { class: "headline" },
      el("span", { class: "version", dataset: { field: "version" } }, release.version),
      el("span", { class: "percent", dataset: { field: "percent" } }, `${release.rollout_percent} %`, el("small", {}, " rollout")),
      ...badges),
    release.halted ? el("p", { class: "banner bad" },
      `Rollout halted at 0 %: no agent acts on ${release.version}. Agents that already updated stay on it; resume with a rollout percent, or roll back.`) : null,
    el("dl", { class: "facts" },
      fact("Serial", release.serial, "serial"),
      fact("Expires", el("span", { class: `expiry ${expiry.tone}`, dataset: { field: "expires", expires: release.expires } }, expiry.text)),
      fact("Signed", utc(release.signed_at || release.released_at)),
      fact("Released", utc(release.released_at)),
      fact("Container image", release.image || "-"),
      fact("Min version", release.min_version || "-")),
    planView(release),
    el("div", { class: "controls-slot" }));
}

function fact(name, value, field) {
  return el("div", {}, el("dt", {}, name), el("dd", field ? { dataset: { field } } : {}, value));
}

// Called every second: the countdown moves without a poll.
export function tickExpiry(node) {
  const span_ = node.querySelector("[data-field=expires]");
  if (!span_) return;
  const expiry = expiryText(span_.dataset.expires);
  span_.textContent = expiry.text;
  span_.className = `expiry ${expiry.tone}`;
}
