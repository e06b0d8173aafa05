// Past releases (every archived serial, and whether it verifies) and the audit log of actions.

import { ago, clear, el, utc } from "./states.js";

export function renderHistory(node, history) {
  const rows = history.map((h) => el("tr", { dataset: { serial: h.serial } },
    el("td", {}, h.serial ?? "-"),
    el("td", {}, h.version ?? "-", h.live ? el("span", { class: "badge ok" }, " live") : null),
    el("td", {}, h.rollout === null || h.rollout === undefined ? "-" : `${h.rollout} %`),
    el("td", { class: "muted" }, utc(h.signed_at || h.released_at)),
    el("td", {}, h.verified ? el("span", { class: "tone-ok" }, "verifies") : el("span", { class: "tone-bad" }, h.error || "does not verify")),
    el("td", {}, h.downgrade ? el("span", { class: "tone-warn" }, "downgrade") : "")));
  clear(node,
    el("h2", {}, "Releases", el("span", { class: "count" }, history.length)),
    rows.length ? el("div", { class: "table-wrap" }, el("table", {},
      el("thead", {}, el("tr", {}, ["Serial", "Version", "Rollout", "Signed", "Signature", ""].map((c) => el("th", {}, c)))),
      el("tbody", {}, rows))) : el("p", { class: "empty" }, "No archived serials."));
}

export function renderAudit(node, audit) {
  const items = audit.map((e) => el("li", { dataset: { action: e.action } },
    el("span", {}, el("b", {}, e.who), ` ${e.action === "halt" ? "halted" : `set rollout ${e.percent} %`} · ${e.version}`),
    el("span", { class: "detail" }, `serial ${e.serial_before} → ${e.serial_after}${e.status === "unchanged" ? " (already so: nothing signed)" : ""} · ${utc(e.time)} (${ago(e.time)})`)));
  clear(node,
    el("h2", {}, "Audit log", el("span", { class: "count" }, audit.length)),
    items.length ? el("ul", { class: "list" }, items) : el("p", { class: "empty" }, "No action taken from the console yet."));
}
