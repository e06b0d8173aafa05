// The rollout's progress against the live release, VMs and containers apart: agents on the live
// version, in the wave (updating, about to, or failed to), still behind, and ahead (newer, and the
// release is no downgrade). The white marker is the rollout percent.

import { clear, el, plural } from "./states.js";

const PARTS = [
  ["on_live", "on the live version"],
  ["in_wave", "in the wave, not there yet"],
  ["behind", "not in the wave yet"],
  ["ahead", "on a newer version"],
];
const MODES = [["vm", "VMs", "self-update"], ["container", "Containers", "image rolled by you or the controller"]];

export function renderProgress(node, rollout) {
  if (!rollout) {
    clear(node, el("h2", {}, "Rollout progress"), el("p", { class: "empty" }, "No live release."));
    return;
  }
  const chart = el("div", { class: "chart" });
  for (const [mode, title, note] of MODES) {
    const counts = rollout[mode] || {};
    const total = PARTS.reduce((n, [k]) => n + (counts[k] || 0), 0);
    const bar = el("div", { class: "bar", role: "img", "aria-label": `${title}: ${PARTS.map(([k, t]) => `${counts[k] || 0} ${t}`).join(", ")}`, dataset: { mode } });
    for (const [key] of PARTS) {
      const n = counts[key] || 0;
      if (!n) continue;
      const seg = el("span", { class: `seg-${key}`, title: `${n} ${key.replace("_", " ")}` });
      seg.style.width = `${(100 * n) / total}%`;
      bar.append(seg);
    }
    if (total) {
      const marker = el("span", { class: "marker", title: `rollout ${rollout.percent} %` });
      marker.style.left = `calc(${rollout.percent}% - 1px)`;
      bar.append(marker);
    }
    const legend = el("div", { class: "legend" },
      total === 0 ? el("span", {}, `no ${title.toLowerCase()} have reported`) :
        PARTS.filter(([k]) => k !== "ahead" || counts[k]).map(([k, text]) =>
          el("span", {}, el("i", { class: `k-${k}` }), el("b", { dataset: { count: `${mode}-${k}` } }, (counts[k] || 0).toLocaleString("en")), ` ${text}`)));
    chart.append(
      el("div", { class: "mode" }, title, el("small", {}, `${plural(total, "agent")} · ${note}`)),
      el("div", {}, bar, legend),
    );
  }
  clear(node,
    el("h2", {}, "Rollout progress", el("span", { class: "count" }, `${rollout.version} at ${rollout.percent} %`)),
    chart);
}
