// The gateway's API from the page: same-origin JSON requests, the API key, and SSE streams.

const KEY_ITEM = "ailab.apiKey";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

// Set by the page: shows the key prompt and resolves with a key, or null when cancelled.
let askForKey = async () => null;

export function onKeyNeeded(ask) {
  askForKey = ask;
}

export function hasKey() {
  return sessionStorage.getItem(KEY_ITEM) !== null;
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

function headers(withBody) {
  const result = { Accept: "application/json" };
  if (withBody) result["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function detailOf(response) {
  try {
    const body = await response.json();
    const detail = body.detail ?? body.error ?? body;
    return typeof detail === "string" ? detail : JSON.stringify(detail);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// One request; a 401 asks for a key and tries again with it until the user cancels.
export async function request(method, path, body, signal) {
  for (;;) {
    const response = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      credentials: "same-origin",
      cache: "no-store",
    });
    if (response.status === 401) {
      const key = await askForKey(await detailOf(response));
      if (!key) throw new ApiError(401, "the gateway needs an API key");
      sessionStorage.setItem(KEY_ITEM, key);
      continue;
    }
    if (!response.ok) throw new ApiError(response.status, await detailOf(response));
    return response;
  }
}

export async function getJson(path) {
  return (await request("GET", path)).json();
}

export async function sendJson(method, path, body) {
  return (await request(method, path, body)).json();
}

export async function getText(path) {
  return (await request("GET", path)).text();
}

// /health answers 503 with the same body while the model is not ready: both are answers.
export async function health() {
  const response = await fetch("/health", { headers: headers(false), cache: "no-store" });
  if (response.status === 401) return { status: "locked" };
  return response.json();
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // a keep-alive comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event: name, data: JSON.parse(data.join("\n")) } : null;
}

// The events of a streamed POST as they arrive. Aborting `signal` closes the connection,
// which makes the gateway stop generating.
export async function* events(path, body, signal) {
  const response = await request("POST", path, body, signal);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    // A "\r" at the end may be the first half of "\r\n": keep it until the next chunk.
    const held = buffer.endsWith("\r") ? "\r" : "";
    buffer = buffer.slice(0, buffer.length - held.length).replace(/\r\n?/g, "\n") + held;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const parsed = parseEvent(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
      if (parsed) yield parsed;
    }
  }
}
