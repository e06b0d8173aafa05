// What every view shares: state tones (the CLI's colours), time formatting, a tiny DOM builder.

// One colour per kind of state, the same as publisher/fleet.py STATE_TONES (the CLI's table);
// tests/test_console_page.py holds the two maps together.
export const TONES = {
  "committed": "ok",
  "failed": "bad",
  "rolled_back": "bad",
  "update_available": "warn",
  "downloading": "busy",
  "verifying": "busy",
  "staged": "busy",
  "restarting": "busy",
  "watching": "busy",
  "checking": "idle",
  "heartbeat": "idle"
};
export const STALE_TONE = "stale";

export function tone(state) {
  return TONES[state] || "idle";
}

// el("td", {class: "x", dataset: {agentId: "a"}}, "text", child) — text is always text, never HTML.
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function stateTag(state) {
  return el("span", { class: `pill tone-${tone(state)}` }, state || "-");
}

export function parseTime(iso) {
  const t = Date.parse(iso);
  return Number.isNaN(t) ? null : t;
}

// 45s, 12m, 3h 05m, 2d 04h
export function span(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d ${String(Math.floor((s % 86400) / 3600)).padStart(2, "0")}h`;
}

export function ago(iso, now = Date.now()) {
  const t = parseTime(iso);
  return t === null ? "-" : `${span(now - t)} ago`;
}

// 2026-02-15 20:00 UTC (operators compare with logs, which are in UTC)
export function utc(iso) {
  const t = parseTime(iso);
  if (t === null) return "-";
  return new Date(t).toISOString().replace("T", " ").slice(0, 16) + " UTC";
}

export function clock(ms) {
  return new Date(ms).toISOString().slice(11, 16) + " UTC";
}

export function plural(n, one, many) {
  return `${n.toLocaleString("en")} ${n === 1 ? one : (many || one + "s")}`;
}

export function clear(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}
