// The page's controller: conversations, the composer, and the dialogs, wired to the API.

import * as api from "./api.js";
import { AuditDialog } from "./audit.js";
import { describeHealth, isPooled, ModelsDialog, switchModel } from "./models.js";
import { addUser, element, hasAnswer, removeAnswer, renderHistory, Turn } from "./turn.js";

const $ = (id) => document.getElementById(id);
const list = $("messages");

const state = {
  conversations: [],
  current: null, // { id, title, saved, systemPrompt, model }
  controller: null, // the running turn's AbortController
  health: {},
};

function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return `web-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function showError(message) {
  $("notice").textContent = message;
  $("notice").hidden = !message;
}

// A modal form: resolves true when submitted, false when cancelled (button or Escape).
function ask(dialog) {
  const form = dialog.querySelector("form");
  return new Promise((resolve) => {
    const submit = (event) => {
      event.preventDefault();
      finish(true);
    };
    const cancel = () => finish(false);
    function finish(answer) {
      form.removeEventListener("submit", submit);
      dialog.removeEventListener("close", cancel);
      if (dialog.open) dialog.close();
      resolve(answer);
    }
    form.addEventListener("submit", submit);
    dialog.addEventListener("close", cancel);
    dialog.showModal();
  });
}

let keyPrompt = null;
api.onKeyNeeded((detail) => {
  keyPrompt ??= (async () => {
    const why = detail.replace(/\.?$/, ".");
    $("key-text").textContent = `${why} The key is kept in this tab's session storage only.`;
    $("key-input").value = "";
    const given = (await ask($("key-dialog"))) ? $("key-input").value.trim() : null;
    if (given) $("forget-key").hidden = false;
    keyPrompt = null;
    return given;
  })();
  return keyPrompt;
});

// --- health ----------------------------------------------------------------------------

async function refreshHealth() {
  try {
    state.health = await api.health();
    $("health").textContent = describeHealth(state.health);
    $("health").dataset.status = state.health.status;
  } catch {
    $("health").textContent = "The gateway is not answering";
    $("health").dataset.status = "error";
  }
}

// --- conversations ----------------------------------------------------------------------

function metaText(summary) {
  const updated = new Date(summary.updated_at).toLocaleString();
  const model = summary.model ?? summary.model_key;
  return [model, `${summary.message_count} messages`, updated].filter(Boolean).join(" · ");
}

function conversationItem(summary) {
  const item = document.createElement("li");
  const button = element("button", "conversation");
  button.type = "button";
  button.dataset.id = summary.id;
  if (summary.id === state.current?.id) button.setAttribute("aria-current", "true");
  button.append(element("span", "title", summary.title || summary.id));
  button.append(element("span", "meta", metaText(summary)));
  button.addEventListener("click", () => openConversation(summary.id));
  item.append(button);
  return item;
}

function isListed(id) {
  return state.conversations.some((c) => c.id === id);
}

async function loadConversations() {
  const text = $("search").value.trim();
  const path = text ? `/conversations/search?q=${encodeURIComponent(text)}` : "/conversations";
  const { conversations } = await api.getJson(path);
  state.conversations = conversations;
  $("conversation-list").replaceChildren(...conversations.map(conversationItem));
  $("conversation-empty").hidden = conversations.length > 0;
  $("conversation-empty").textContent = text ? "Nothing matches." : "No conversations yet.";
}

function showCurrent() {
  const { current } = state;
  const summary = state.conversations.find((c) => c.id === current.id);
  current.title = summary?.title ?? current.title;
  $("chat-title").textContent = current.title || (current.saved ? current.id : "New conversation");
  $("chat-meta").textContent = summary ? metaText(summary) : "Not saved until the first message";
  for (const id of ["rename", "export-one", "delete"]) $(id).disabled = !current.saved;
  $("regenerate").disabled = Boolean(state.controller) || !current.saved || !hasAnswer(list);
  $("empty-chat").hidden = list.children.length > 1;
  for (const button of document.querySelectorAll(".conversation")) {
    button.toggleAttribute("aria-current", button.dataset.id === current.id);
  }
}

function clearMessages() {
  list.replaceChildren($("empty-chat"));
  showError("");
}

function freshConversation(systemPrompt = null, model = null) {
  state.current = { id: newId(), title: null, saved: false, systemPrompt, model };
  clearMessages();
  showCurrent();
  updateBudget();
}

function systemPromptOf(messages) {
  const systems = messages.filter((m) => m.role === "system");
  return systems.length ? systems[systems.length - 1].content : null;
}

async function openConversation(id) {
  try {
    const { messages } = await api.getJson(`/conversations/${encodeURIComponent(id)}`);
    state.current = { id, title: null, saved: true, systemPrompt: systemPromptOf(messages) };
    clearMessages();
    renderHistory(list, messages);
    showCurrent();
    list.scrollTop = list.scrollHeight;
    setSidebar(false);
    await updateBudget();
  } catch (error) {
    showError(error.message);
  }
}

async function updateBudget() {
  const size = state.health.n_ctx;
  let tokens = 0;
  if (state.current?.saved && size && state.health.status === "ok") {
    const body = { command: "history", conversation_id: state.current.id };
    tokens = (await api.sendJson("POST", "/command", body)).value?.tokens ?? 0;
  }
  const meter = $("budget");
  meter.max = size || 1;
  meter.low = 0.7 * meter.max;
  meter.high = 0.9 * meter.max;
  meter.value = tokens;
  $("budget-text").textContent = size ? `≈ ${tokens} of ${size} tokens` : `${tokens} tokens`;
}

// --- turns ------------------------------------------------------------------------------

// Busy from the start of an action that streams a turn until everything after it is shown.
function setBusy(controller) {
  state.controller = controller;
  const busy = Boolean(controller);
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("sidebar").inert = busy;
  $("chat-head-actions").inert = busy;
  $("regenerate").disabled = busy || !state.current.saved || !hasAnswer(list);
}

// Actions that stream a turn run one after another: an approval clicked while the turn
// that asked for it is still being wrapped up waits for it.
let actions = Promise.resolve();

function whileBusy(action) {
  const run = actions.then(async () => {
    try {
      await action();
    } finally {
      setBusy(null);
    }
  });
  actions = run.catch(() => {});
  return run;
}

function toolChoice() {
  if ($("tool-choice").value !== "named") return $("tool-choice").value;
  const name = $("tool-name").value.trim();
  if (!name) throw new Error("type the name of the tool to call, or choose another tool choice");
  return { type: "function", function: { name } };
}

function turnOptions() {
  const body = {
    conversation_id: state.current.id,
    stream: true,
    enable_tools: $("use-tools").checked,
    tool_choice: toolChoice(),
  };
  if (state.current.systemPrompt) body.system_prompt = state.current.systemPrompt;
  if (state.current.model && !state.current.saved) body.model = state.current.model;
  const maxTokens = $("max-tokens").valueAsNumber;
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const temperature = $("temperature").valueAsNumber;
  if (temperature >= 0) body.temperature = temperature;
  return body;
}

// Streams one turn into the list; returns the error that stopped it before it began, if any.
async function runTurn(path, body) {
  const controller = new AbortController();
  setBusy(controller);
  const turn = new Turn(list, decide);
  let refused = null;
  try {
    for await (const { event, data } of api.events(path, body, controller.signal)) {
      turn.handle(event, data);
      list.scrollTop = list.scrollHeight;
    }
  } catch (error) {
    if (controller.signal.aborted) turn.stopped();
    else if (error instanceof api.ApiError) refused = error;
    else turn.fail(error.message);
  }
  $("stop").disabled = true;
  await afterTurn(controller.signal.aborted);
  return refused;
}

// A stopped turn is stored by the gateway just after the stream ends: look a few times.
const STORED_AFTER_STOP_TRIES = 10;
const STORED_AFTER_STOP_WAIT_MS = 300;

async function afterTurn(stopped = false) {
  await loadConversations();
  for (let tries = 0; stopped && !isListed(state.current.id) && tries < STORED_AFTER_STOP_TRIES; tries++) {
    await new Promise((resolve) => setTimeout(resolve, STORED_AFTER_STOP_WAIT_MS));
    await loadConversations();
  }
  state.current.saved = isListed(state.current.id);
  showCurrent();
  await refreshHealth();
  await updateBudget();
}

async function decide(approval, approve) {
  const body = {
    conversation_id: state.current.id,
    approval_id: approval.approval_id,
    approve,
    stream: true,
  };
  await whileBusy(async () => {
    const refused = await runTurn("/chat/approve", body);
    if (refused) showError(refused.message);
  });
}

async function send() {
  const text = $("prompt").value;
  if (!text.trim() || state.controller) return;
  let body;
  try {
    body = { ...turnOptions(), messages: [{ role: "user", content: text }] };
  } catch (error) {
    showError(error.message);
    return;
  }
  showError("");
  $("prompt").value = "";
  $("empty-chat").hidden = true;
  const message = addUser(list, text);
  await whileBusy(async () => {
    const refused = await runTurn("/chat", body);
    if (refused) {
      message.remove(); // the gateway stored nothing: the text goes back to the composer
      $("prompt").value = text;
      showError(refused.message);
    }
  });
  $("prompt").focus();
}

async function regenerate() {
  if (state.controller) return;
  let body;
  try {
    body = turnOptions();
  } catch (error) {
    showError(error.message);
    return;
  }
  showError("");
  removeAnswer(list);
  const id = encodeURIComponent(state.current.id);
  await whileBusy(async () => {
    const refused = await runTurn(`/conversations/${id}/regenerate`, body);
    if (refused) {
      await openConversation(state.current.id); // show what is stored, then why it failed
      showError(refused.message);
    }
  });
}

// --- conversation actions --------------------------------------------------------------

async function newConversation() {
  const select = $("new-model");
  const { models, current } = await api.getJson("/models");
  select.replaceChildren(
    ...models
      .filter((m) => m.exists || m.hf_repo)
      .map((m) => {
        const option = element("option", "", `${m.name} (${m.key})`);
        option.value = m.key;
        option.selected = m.key === current;
        return option;
      }),
  );
  $("new-system").value = "";
  $("new-status").textContent = "";
  if (!(await ask($("new-dialog")))) return;
  const systemPrompt = $("new-system").value.trim() || null;
  // A gateway with one model at a time has to switch; a pool routes by the request's model.
  if (!isPooled(models) && select.value && select.value !== current) {
    $("health").textContent = `Switching to ${select.value}…`;
    try {
      await switchModel(select.value);
    } catch (error) {
      showError(error.message);
    }
    await refreshHealth();
  }
  freshConversation(systemPrompt, select.value || null);
  setSidebar(false);
  $("prompt").focus();
}

async function rename() {
  $("rename-title").value = state.current.title ?? "";
  if (!(await ask($("rename-dialog")))) return;
  try {
    const path = `/conversations/${encodeURIComponent(state.current.id)}`;
    await api.sendJson("PATCH", path, { title: $("rename-title").value });
    state.current.title = null;
    await loadConversations();
    showCurrent();
  } catch (error) {
    showError(error.message);
  }
}

async function remove() {
  const name = state.current.title || state.current.id;
  $("delete-text").textContent = `“${name}” and all its messages will be deleted. This cannot be undone.`;
  if (!(await ask($("delete-dialog")))) return;
  try {
    await api.sendJson("DELETE", `/conversations/${encodeURIComponent(state.current.id)}`);
    freshConversation();
    await loadConversations();
  } catch (error) {
    showError(error.message);
  }
}

async function download(path, filename) {
  try {
    const text = await api.getText(path);
    const url = URL.createObjectURL(new Blob([text], { type: "application/jsonl" }));
    const link = element("a");
    link.href = url;
    link.download = filename;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (error) {
    showError(error.message);
  }
}

function exportOne() {
  const id = state.current.id;
  const file = `${id.replace(/[^\w.-]+/g, "_")}.jsonl`;
  return download(`/conversations/${encodeURIComponent(id)}/export?format=jsonl`, file);
}

// --- wiring -----------------------------------------------------------------------------

function setSidebar(open) {
  document.body.classList.toggle("sidebar-open", open);
  $("toggle-sidebar").setAttribute("aria-expanded", String(open));
}

function debounce(fn, ms) {
  let timer = 0;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}

function wire() {
  const models = new ModelsDialog(async () => {
    await refreshHealth();
    await updateBudget();
  });
  const audit = new AuditDialog(() => (state.current?.saved ? state.current.id : null));
  for (const button of document.querySelectorAll("[data-close]")) {
    button.addEventListener("click", () => button.closest("dialog").close());
  }
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("tool-choice").addEventListener("change", () => {
    $("tool-name").hidden = $("tool-choice").value !== "named";
  });
  $("new-conversation").addEventListener("click", newConversation);
  $("rename").addEventListener("click", rename);
  $("delete").addEventListener("click", remove);
  $("export-one").addEventListener("click", exportOne);
  $("export-all").addEventListener("click", () =>
    download("/conversations/export?format=jsonl", "ailab-conversations.jsonl"));
  $("search").addEventListener("input", debounce(() => loadConversations().catch((e) => showError(e.message)), 250));
  $("open-models").addEventListener("click", () => models.open());
  $("open-audit").addEventListener("click", () => audit.open());
  $("toggle-sidebar").addEventListener("click", () =>
    setSidebar(!document.body.classList.contains("sidebar-open")));
  $("forget-key").hidden = !api.hasKey();
  $("forget-key").addEventListener("click", () => {
    api.forgetKey();
    $("forget-key").hidden = true;
  });
}

async function start() {
  wire();
  freshConversation();
  await refreshHealth();
  setInterval(refreshHealth, 3000);
  // Ready before the first list: with API keys on, that list waits for the key dialog.
  document.body.dataset.ready = "true";
  try {
    await loadConversations();
  } catch (error) {
    showError(error.message);
  }
}

start();
