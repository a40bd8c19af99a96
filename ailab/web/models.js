// Models on the page: the health line, the picker with each model's state, switching.

import * as api from "./api.js";
import { element } from "./turn.js";

const $ = (id) => document.getElementById(id);

function percent(download) {
  return download?.percent == null ? "" : ` ${Math.round(download.percent)}%`;
}

export function describeHealth(health) {
  const model = health.model_name ?? health.model_key ?? "";
  switch (health.status) {
    case "ok": return ["Ready", model, health.device].filter(Boolean).join(" · ");
    case "loading":
      return health.download && !health.download.done
        ? `Downloading ${model}${percent(health.download)}`
        : `Loading ${model}…`;
    case "restarting": return `Restarting ${model}…`;
    case "locked": return "API key needed";
    default: return `Error: ${health.message ?? "llama-server is not running"}`;
  }
}

// What the gateway says of a model. A gateway that reports states per model is used as is;
// one that runs a single model is described from /health.
export function modelState(model, health) {
  if (model.state) {
    if (model.state === "failed" && model.message) return `failed: ${model.message}`;
    if (model.state === "downloading") return `downloading${percent(model.download)}`;
    if (model.state === "unloaded" && model.exists === false) return "not downloaded";
    return model.state;
  }
  if (model.current) {
    if (health.status === "ok") return "ready";
    if (health.status === "error") return `failed: ${health.message ?? "not running"}`;
    if (health.download && !health.download.done) return `downloading${percent(health.download)}`;
    return "loading";
  }
  return model.exists ? "unloaded" : "not downloaded";
}

function megabytes(value) {
  return value == null ? null : `${Math.round(value)} MB`;
}

function memoryText(model, memory) {
  const pooled = model.state !== undefined;
  const measured = pooled ? model.memory_measured_mb : model.current ? memory?.llama_rss_mb : null;
  const parts = [];
  if (measured != null) parts.push(`memory ${megabytes(measured)}`);
  if (model.memory_estimate_mb != null) parts.push(`estimate ${megabytes(model.memory_estimate_mb)}`);
  return parts.join(", ");
}

function details(model, memory) {
  return [
    model.key,
    model.size_bytes ? `file ${megabytes(model.size_bytes / 1048576)}` : null,
    model.context_length ? `context ${model.context_length}` : null,
    memoryText(model, memory),
  ].filter(Boolean).join(" · ");
}

// A gateway that reports a state per model runs several at once and routes by model.
export function isPooled(models) {
  return models.some((model) => model.state !== undefined);
}

export async function switchModel(key) {
  return api.sendJson("POST", "/model/switch", { model_key: key });
}

function actionButton(label, model, run) {
  const button = element("button", "", label);
  button.type = "button";
  button.setAttribute("aria-label", `${label} ${model.name}`);
  button.addEventListener("click", run);
  return button;
}

export class ModelsDialog {
  constructor(onChange) {
    this.dialog = $("models-dialog");
    this.onChange = onChange;
    this.timer = 0;
    this.dialog.addEventListener("close", () => clearInterval(this.timer));
    $("layers-apply").addEventListener("click", () => this.setLayers());
  }

  async open() {
    this.dialog.showModal();
    await this.refresh();
    this.timer = setInterval(() => this.refresh(), 1000);
  }

  async refresh() {
    try {
      const [models, health] = await Promise.all([api.getJson("/models"), api.health()]);
      const memory = isPooled(models.models) || health.status !== "ok"
        ? null
        : (await this.command("mem")).value;
      this.render(models.models, health, memory);
      await this.showLayers(health);
    } catch (error) {
      $("models-status").textContent = error.message;
    }
  }

  async command(command, value) {
    return api.sendJson("POST", "/command", value === undefined ? { command } : { command, value });
  }

  render(models, health, memory) {
    const pooled = isPooled(models);
    $("model-list").replaceChildren(...models.map((model) => this.row(model, health, memory, pooled)));
  }

  row(model, health, memory, pooled) {
    const item = element("li", "model");
    item.dataset.key = model.key;
    const state = modelState(model, health);
    const badge = element("span", "model-state", state);
    badge.dataset.state = state.split(/[ :]/)[0];
    const heading = element("div", "model-head");
    heading.append(element("strong", "", model.name), " ", badge);
    if (model.recommended) heading.append(" ", element("span", "tag", "recommended"));
    const buttons = element("div", "model-buttons");
    if (pooled) {
      const loaded = ["ready", "loading", "downloading"].includes(model.state);
      buttons.append(actionButton(loaded ? "Unload" : "Load", model, () =>
        this.act(loaded ? "/models/unload" : "/models/load", { model: model.key })));
    }
    const label = pooled ? "Set default" : "Switch to";
    const switcher = actionButton(label, model, () => this.switchTo(model));
    switcher.disabled = Boolean(model.current) || (!model.exists && !model.hf_repo);
    buttons.append(switcher);
    item.append(heading, element("p", "muted", details(model, memory)), buttons);
    return item;
  }

  async act(path, body) {
    try {
      await api.sendJson("POST", path, body);
    } catch (error) {
      $("models-status").textContent = error.message;
    }
    await this.refresh();
  }

  async switchTo(model) {
    $("models-status").textContent = `Switching to ${model.name}…`;
    try {
      const result = await switchModel(model.key);
      $("models-status").textContent = result.message;
    } catch (error) {
      $("models-status").textContent = error.message;
    }
    await this.refresh();
    this.onChange();
  }

  async showLayers(health) {
    // GPU layers mean something only where llama-server found a GPU.
    const gpu = (health.device ?? "CPU") !== "CPU" || (health.gpu_devices ?? []).length > 0;
    $("layers-box").hidden = !gpu;
    if (gpu && document.activeElement !== $("layers-input")) {
      $("layers-input").value = (await this.command("layers")).value;
    }
  }

  async setLayers() {
    $("models-status").textContent = "Restarting llama-server with the new GPU layers…";
    try {
      const result = await this.command("layers", $("layers-input").value);
      $("models-status").textContent = result.message;
    } catch (error) {
      $("models-status").textContent = error.message;
    }
    await this.refresh();
  }
}
