// The operator API (DESIGN section 9) from the page: the token, conditional GETs, actions.
//
// The token lives in sessionStorage (this tab only). Every GET remembers its ETag and body per
// URL and sends If-None-Match, so a poll that changes nothing costs a 304 and no rendering.

const TOKEN_KEY = "avika.console.token";
const cache = new Map(); // url -> {etag, body}

export class ApiError extends Error {
  constructor(status, code, message, body) {
    super(message);
    this.status = status;
    this.code = code;
    this.body = body || {};
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
  cache.clear();
}

export function forget() {
  sessionStorage.removeItem(TOKEN_KEY);
  cache.clear();
}

// A token in the address bar's fragment (#token=...): taken, then removed from the address bar
// and the history, so it is neither bookmarked nor shown over a shoulder.
export function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const value = params.get("token");
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  if (value) setToken(value.trim());
  return Boolean(value);
}

async function errorOf(response) {
  let body = {};
  try {
    body = await response.json();
  } catch (_) {
    body = {};
  }
  return new ApiError(response.status, body.error || `http_${response.status}`, body.message || response.statusText, body);
}

function headers(extra) {
  const h = { "Accept": "application/json", ...extra };
  const t = token();
  if (t) h["Authorization"] = `Bearer ${t}`;
  return h;
}

// {body, changed}: changed is false when the server answered 304 (same body as last time).
export async function get(url) {
  const known = cache.get(url);
  const extra = known ? { "If-None-Match": known.etag } : {};
  const response = await fetch(url, { headers: headers(extra), cache: "no-store", credentials: "omit" });
  if (response.status === 304 && known) return { body: known.body, changed: false };
  if (!response.ok) throw await errorOf(response);
  const body = await response.json();
  const etag = response.headers.get("ETag");
  if (etag) cache.set(url, { etag, body });
  return { body, changed: true };
}

// An action on the release the operator is looking at: If-Match carries its serial.
export async function act(path, serial, payload) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", "If-Match": `"${serial}"` }),
    body: JSON.stringify(payload || {}),
    cache: "no-store",
    credentials: "omit",
  });
  if (!response.ok) throw await errorOf(response);
  cache.clear();
  return response.json();
}
