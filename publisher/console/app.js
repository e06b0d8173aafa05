// The console page: sign-in, polling, and handing each answer to its view.
//
// Polls /v1/fleet (the table's first page, the whole-fleet summary, the live release) and
// /v1/releases (canary, history, audit, who is asking) every 5 s, every 30 s while the tab is
// hidden, always with If-None-Match: an unchanged fleet costs a 304 and no re-render.

import { ApiError, forget, get, setToken, takeTokenFromFragment, token } from "./api.js";
import { renderControls } from "./actions.js";
import { openAgent } from "./agent.js";
import { renderAttention } from "./attention.js";
import { renderCanary } from "./canary.js";
import { renderAudit, renderHistory } from "./history.js";
import { renderProgress } from "./progress.js";
import { renderRelease, tickExpiry } from "./release.js";
import { ago, el } from "./states.js";
import { renderSummary } from "./summary.js";
import { FILTERS, renderTable } from "./table.js";

const VISIBLE_MS = 5000;
const HIDDEN_MS = 30000;
const PAGE = 200;

const $ = (id) => document.getElementById(id);
const view = {
  filters: Object.fromEntries(FILTERS.map((f) => [f, ""])),
  fleet: null,
  releases: null,
  extra: [], // agents of further pages ("load more")
  next: null,
  paused: false,
  lastOk: null,
  timer: null,
};

function fleetUrl(cursor) {
  const q = new URLSearchParams({ limit: String(PAGE) });
  for (const f of FILTERS) if (view.filters[f]) q.set(f, view.filters[f]);
  if (cursor) q.set("cursor", cursor);
  return `/v1/fleet?${q}`;
}

function toast(text, toneName) {
  const node = $("toast");
  node.textContent = text;
  node.className = `toast ${toneName || ""}`;
  node.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { node.hidden = true; }, 9000);
}

function showLogin(message) {
  $("console").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("freshness").textContent = "";
  $("token-input").focus();
}

function showConsole() {
  $("login").hidden = true;
  $("console").hidden = false;
}

function onAgent(agentId) {
  openAgent($("agent"), agentId);
}

function setFilters(changes) {
  view.filters = { ...view.filters, ...changes };
  view.extra = [];
  view.paused = false;
  refresh();
}

const tableHandlers = {
  onAgent,
  onFilter: (name, value) => setFilters({ [name]: value }),
  onClear: () => setFilters(Object.fromEntries(FILTERS.map((f) => [f, ""]))),
  onMore: async () => {
    try {
      const { body } = await get(fleetUrl(view.next));
      view.extra.push(...body.agents);
      view.next = body.next || null;
      view.paused = true;
      drawTable();
    } catch (err) {
      toast(err.message, "bad");
    }
  },
  onLive: () => setFilters({}),
};

function drawTable() {
  const fleet = view.fleet;
  const total = fleet.summary.total;
  renderTable($("agents"), {
    agents: [...fleet.agents, ...view.extra],
    filters: view.filters,
    summary: fleet.summary,
    next: view.next,
    paused: view.paused,
    total,
  }, tableHandlers);
}

function drawFleet() {
  const fleet = view.fleet;
  renderRelease($("release"), fleet.release, fleet.release_error);
  renderProgress($("progress"), fleet.summary.rollout);
  renderSummary($("summary"), fleet.summary, fleet.release, (filter) => {
    setFilters({ ...Object.fromEntries(FILTERS.map((f) => [f, ""])), ...filter });
    $("agents").scrollIntoView({ behavior: "smooth", block: "start" });
  });
  renderAttention($("attention"), fleet.summary, onAgent);
  drawControls();
}

function drawControls() {
  const slot = $("release").querySelector(".controls-slot");
  if (!slot || !view.fleet) return;
  const session = view.releases ? view.releases.session : null;
  renderControls(slot, view.fleet.release, session, (message, toneName) => {
    toast(message, toneName);
    refresh();
  });
}

function drawReleases() {
  const r = view.releases;
  renderCanary($("canary"), r.canary, onAgent);
  renderHistory($("history"), r.history);
  renderAudit($("audit"), r.audit);
  const s = r.session;
  $("who-name").replaceChildren(el("strong", {}, s.who), ` · ${s.scopes.includes("operate") ? "can operate" : "read only"}`);
  $("who").hidden = false;
}

function freshness() {
  const node = $("freshness");
  if (!view.lastOk) return;
  const late = Date.now() - view.lastOk > 3 * (document.hidden ? HIDDEN_MS : VISIBLE_MS);
  node.textContent = `updated ${ago(new Date(view.lastOk).toISOString())}${late ? " · cannot reach the server" : ""}`;
  node.classList.toggle("late", late);
}

async function refresh() {
  clearTimeout(view.timer);
  try {
    const [fleet, releases] = await Promise.all([get(fleetUrl()), get("/v1/releases")]);
    showConsole();
    $("error-banner").hidden = true;
    const releasesChanged = releases.changed || !view.releases;
    view.releases = releases.body;
    if (releasesChanged) drawReleases();
    if (fleet.changed || !view.fleet || releasesChanged) {
      view.fleet = fleet.body;
      drawFleet();
      if (!view.paused) {
        view.next = fleet.body.next || null;
        view.extra = [];
        drawTable();
      }
    }
    view.lastOk = Date.now();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      forget();
      showLogin("That token was not accepted. Paste a valid console token.");
      return;
    }
    const message = err instanceof ApiError
      ? `The server answered ${err.status} ${err.code}: ${err.message}`
      : `Cannot reach the server (${err.message}); retrying.`;
    if (view.fleet) {
      $("error-banner").textContent = message;
      $("error-banner").hidden = false;
    } else {
      showLogin(message);
    }
  } finally {
    freshness();
    if (token()) view.timer = setTimeout(refresh, document.hidden ? HIDDEN_MS : VISIBLE_MS);
  }
}

function start() {
  takeTokenFromFragment();
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) return;
    $("token-input").value = "";
    setToken(value);
    refresh();
  });
  document.querySelector("[data-action=logout]").addEventListener("click", () => {
    forget();
    clearTimeout(view.timer);
    view.fleet = view.releases = null;
    showLogin("Signed out.");
  });
  // A link with another #token= opened in this tab changes only the fragment: take it too.
  window.addEventListener("hashchange", () => { if (takeTokenFromFragment()) refresh(); });
  document.addEventListener("visibilitychange", () => { if (!document.hidden && token()) refresh(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") $("agent").hidden = true; });
  setInterval(() => { tickExpiry($("release")); freshness(); }, 1000);
  if (token()) refresh();
  else showLogin();
}

start();
