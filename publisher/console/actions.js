// Rollout and halt (operate tokens only), each confirmed. Controls carry data-action attributes
// (DESIGN section 9): `rollout` with its input `data-field="rollout-percent"`, `halt`, and
// `confirm` / `cancel` on the confirmation. The action names the serial the operator is looking
// at (If-Match): if the release moved meanwhile the server refuses (412) and nothing is signed.

import { act, ApiError } from "./api.js";
import { el } from "./states.js";

export function renderControls(slot, release, session, done) {
  slot.replaceChildren();
  if (!release || !session || !session.scopes.includes("operate")) return;
  const box = el("div", { class: "controls" });
  slot.append(box);
  if (!session.can_sign) {
    box.append(el("span", { class: "muted" }, "This console has no signing key: it can show, not act."));
    return;
  }
  const input = el("input", {
    type: "number", min: 0, max: 100, step: 1, value: release.rollout_percent,
    id: "rollout-percent", dataset: { field: "rollout-percent" }, "aria-label": "Rollout percent",
  });
  const confirmSlot = el("div");
  const ask = (kind) => {
    const percent = kind === "halt" ? 0 : Number(input.value);
    if (kind === "rollout" && !(Number.isInteger(percent) && percent >= 0 && percent <= 100)) {
      confirmSlot.replaceChildren(el("p", { class: "error" }, "The rollout percent is a whole number from 0 to 100."));
      return;
    }
    confirmSlot.replaceChildren(confirmation(kind, percent, release, () => confirmSlot.replaceChildren(), done));
  };
  box.append(
    el("label", { for: "rollout-percent" }, "Rollout"), input, el("span", { class: "muted" }, "%"),
    el("button", { type: "button", class: "primary", dataset: { action: "rollout" }, onclick: () => ask("rollout") }, "Set rollout"),
    el("button", { type: "button", class: "danger", dataset: { action: "halt" }, disabled: release.halted, onclick: () => ask("halt") }, "Halt rollout"),
  );
  slot.append(confirmSlot);
}

function confirmation(kind, percent, release, close, done) {
  const what = kind === "halt"
    ? `Halt ${release.version} (serial ${release.serial})? It is signed again at rollout 0 % as a new serial. No agent starts it any more; agents that already run it stay on it.`
    : `Set the rollout of ${release.version} (serial ${release.serial}) from ${release.rollout_percent} % to ${percent} %? It is signed again as a new serial.` +
      (percent > release.rollout_percent ? " Agents whose wave bucket is below the new percent start updating at their next check." : "");
  const status = el("p", { class: "error", role: "alert" });
  const confirmButton = el("button", {
    type: "button", class: kind === "halt" ? "danger" : "primary", dataset: { action: "confirm" },
    onclick: async () => {
      confirmButton.disabled = true;
      status.textContent = "";
      try {
        const result = await act(kind === "halt" ? "/v1/halt" : "/v1/rollout", release.serial, kind === "halt" ? {} : { percent });
        close();
        done(result.status === "unchanged"
          ? `Already at ${result.percent} %: nothing signed (serial ${result.serial}).`
          : `${kind === "halt" ? "Halted" : `Rollout set to ${result.percent} %`}: ${result.version} signed as serial ${result.serial}.`, "ok");
      } catch (err) {
        confirmButton.disabled = false;
        if (err instanceof ApiError && err.status === 412) {
          close();
          done(`Nothing signed: the release changed since you looked (now serial ${err.body.live_serial}, ${err.body.live_version}). Look again, then retry.`, "bad");
        } else {
          status.textContent = err instanceof ApiError ? `${err.status} ${err.code}: ${err.message}` : String(err);
        }
      }
    },
  }, kind === "halt" ? "Confirm halt" : `Confirm ${percent} %`);
  return el("div", { class: `confirm ${kind === "halt" ? "danger" : ""}`, dataset: { role: "confirm" } },
    el("p", {}, what),
    el("div", { class: "buttons" }, confirmButton,
      el("button", { type: "button", dataset: { action: "cancel" }, onclick: close }, "Cancel")),
    status);
}
