// A conversation on screen: its stored messages, and a turn drawn as its events stream in.

import { parseJsonIn, prettyJson, renderMarkdown } from "./render.js";

export function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function textOf(content) {
  if (Array.isArray(content)) {
    return content.map((part) => (typeof part === "string" ? part : part?.text ?? "")).join("");
  }
  return typeof content === "string" ? content : "";
}

export function addUser(list, content) {
  const article = element("article", "msg user");
  article.setAttribute("aria-label", "You");
  article.append(element("div", "body", textOf(content)));
  list.append(article);
  return article;
}

function addSystem(list, content) {
  const details = element("details", "msg system");
  details.append(element("summary", "", "System prompt"), element("div", "body", textOf(content)));
  list.append(details);
}

function addAssistant(list) {
  const article = element("article", "msg assistant");
  article.setAttribute("aria-label", "Assistant");
  const body = element("div", "body markdown");
  article.append(body);
  list.append(article);
  return body;
}

export function addNotice(list, text, kind = "info") {
  const notice = element("p", `notice ${kind}`, text);
  if (kind === "error") notice.setAttribute("role", "alert");
  list.append(notice);
}

function resultStatus(result) {
  if (typeof result === "string") {
    const parsed = parseJsonIn(result);
    return parsed ? resultStatus(parsed.value) : "done";
  }
  return result?.status === "success" ? "ok" : result?.status ?? "done";
}

function toolPanel(list, id, name, args) {
  const panel = element("details", "tool");
  panel.dataset.callId = id ?? "";
  panel.dataset.tool = name ?? "";
  const summary = element("summary");
  summary.append(element("span", "tool-name", `Tool call: ${name || "?"}`), " ");
  const status = element("span", "tool-status", "running…");
  summary.append(status);
  const result = element("pre", "tool-result", "(no result yet)");
  panel.append(
    summary,
    element("h4", "", "Arguments"),
    element("pre", "tool-args", prettyJson(args ?? {})),
    element("h4", "", "Result"),
    result,
  );
  list.append(panel);
  return panel;
}

// A call's result may arrive in a later response than the call (after an approval).
function panelFor(list, id, name) {
  const panels = [...list.querySelectorAll("details.tool")];
  return panels.find((panel) => id && panel.dataset.callId === id) ?? toolPanel(list, id, name);
}

function setStatus(panel, text) {
  panel.querySelector(".tool-status").textContent = text;
  panel.dataset.status = text;
}

function setResult(panel, result) {
  panel.querySelector(".tool-result").textContent = prettyJson(result);
  setStatus(panel, resultStatus(result));
}

// The node after which a regenerated answer replaces the old one.
function lastUser(list) {
  const users = list.querySelectorAll(".msg.user");
  return users.length ? users[users.length - 1] : null;
}

export function hasAnswer(list) {
  const user = lastUser(list);
  return Boolean(user?.nextElementSibling?.matches(".msg.assistant, .tool"));
}

export function removeAnswer(list) {
  const user = lastUser(list);
  while (user?.nextElementSibling) user.nextElementSibling.remove();
}

export function renderHistory(list, messages) {
  for (const message of messages) {
    if (message.role === "user") addUser(list, message.content);
    else if (message.role === "system") addSystem(list, message.content);
    else if (message.role === "tool") {
      setResult(panelFor(list, message.tool_call_id, message.name), message.content);
    } else if (message.role === "assistant") {
      if (textOf(message.content)) renderMarkdown(addAssistant(list), textOf(message.content));
      if (message.interrupted) addNotice(list, "This answer was interrupted.");
      for (const call of message.tool_calls ?? []) {
        toolPanel(list, call.id, call.function?.name, call.function?.arguments);
      }
    }
  }
}

function statsText(done) {
  const parts = [
    `${done.tokens_generated} tokens`,
    `${done.tokens_per_second} tok/s`,
    done.model_key,
    done.device,
  ];
  if (done.trimmed_messages) parts.push(`${done.trimmed_messages} older messages left out`);
  if (done.tool_cap_hit) parts.push("tool-call limit reached");
  return parts.filter(Boolean).join(" · ");
}

// One streamed turn. `decide(approval, approve)` runs when a person answers an approval.
export class Turn {
  constructor(list, decide) {
    this.list = list;
    this.decide = decide;
    this.body = null;
    this.text = "";
    this.frame = 0;
  }

  handle(event, data) {
    if (event === "delta") this.delta(data.content ?? "");
    else if (event === "tool_call") this.toolCall(data);
    else if (event === "tool_result") this.toolResult(data);
    else if (event === "approval_required") this.approval(data);
    else if (event === "done") this.done(data);
    else if (event === "error") this.fail(data.error ?? "the answer failed");
  }

  delta(text) {
    if (!this.body) {
      this.body = addAssistant(this.list);
      this.text = "";
    }
    this.text += text;
    // Markdown is redrawn once per frame, not once per token.
    this.frame ||= requestAnimationFrame(() => this.flush());
  }

  flush() {
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    if (this.body) renderMarkdown(this.body, this.text);
  }

  toolCall(data) {
    this.flush();
    this.body = null;
    toolPanel(this.list, data.id, data.name, data.arguments);
  }

  toolResult(data) {
    setResult(panelFor(this.list, data.id, data.name), data.result);
  }

  approval(data) {
    this.flush();
    this.body = null;
    const waiting = [...this.list.querySelectorAll("details.tool:not([data-status])")]
      .filter((panel) => panel.dataset.tool === data.tool);
    if (waiting.length) setStatus(waiting[waiting.length - 1], "waiting for approval");
    const box = element("section", "approval");
    box.setAttribute("aria-label", `Approval needed for ${data.tool}`);
    const approve = element("button", "primary", "Approve");
    const decline = element("button", "danger", "Decline");
    for (const [button, answer] of [[approve, true], [decline, false]]) {
      button.type = "button";
      button.addEventListener("click", () => {
        approve.disabled = decline.disabled = true;
        box.dataset.decision = answer ? "approved" : "declined";
        this.decide(data, answer);
      });
    }
    const buttons = element("div", "approval-buttons");
    buttons.append(approve, decline);
    box.append(
      element("h3", "", `Approval needed: ${data.tool}`),
      element("p", "approval-reason", data.reason ?? data.description ?? ""),
      element("pre", "tool-args", prettyJson(data.arguments)),
      buttons,
    );
    this.list.append(box);
    approve.focus();
  }

  done(data) {
    this.flush();
    if (!this.body && data.response && !data.pending_approval) {
      renderMarkdown(addAssistant(this.list), data.response);
    }
    this.list.append(element("p", "turn-stats muted", statsText(data)));
  }

  stopped() {
    this.flush();
    addNotice(this.list, "Stopped. The answer so far is kept in the conversation.");
  }

  fail(message) {
    this.flush();
    addNotice(this.list, message, "error");
  }
}
