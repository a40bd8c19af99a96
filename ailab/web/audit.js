// The tool audit log: every tool call the gateway ran or refused, newest first.

import * as api from "./api.js";
import { prettyJson } from "./render.js";
import { element } from "./turn.js";

const $ = (id) => document.getElementById(id);

function row(record) {
  const tr = document.createElement("tr");
  const cells = [
    new Date(record.timestamp).toLocaleString(),
    record.conversation_id ?? "",
    record.tool,
    prettyJson(record.arguments),
    record.status,
    record.approval,
    Math.round(record.duration_ms ?? 0),
    record.error ?? "",
  ];
  for (const value of cells) tr.append(element("td", "", String(value)));
  tr.children[3].className = "code";
  return tr;
}

export class AuditDialog {
  constructor(currentConversation) {
    this.dialog = $("audit-dialog");
    this.currentConversation = currentConversation;
    $("audit-refresh").addEventListener("click", () => this.refresh());
    $("audit-this").addEventListener("change", () => this.refresh());
  }

  async open() {
    this.dialog.showModal();
    await this.refresh();
  }

  async refresh() {
    const params = new URLSearchParams({ limit: "200" });
    const conversation = this.currentConversation();
    if ($("audit-this").checked && conversation) params.set("conversation_id", conversation);
    const body = $("audit-table").tBodies[0];
    try {
      const { records } = await api.getJson(`/tools/audit?${params}`);
      body.replaceChildren(...records.map(row));
      $("audit-empty").hidden = records.length > 0;
    } catch (error) {
      body.replaceChildren();
      $("audit-empty").hidden = false;
      $("audit-empty").textContent = error.message;
    }
  }
}
