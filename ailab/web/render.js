// Untrusted text (model answers, tool output) into the DOM: Markdown, then DOMPurify, then
// highlighted code. Nothing else in the page assigns HTML; the CSP's Trusted Types make the
// browser refuse any HTML string that did not come out of DOMPurify.

import { marked } from "./vendor/marked/marked.esm.js";
import DOMPurify from "./vendor/dompurify/purify.es.mjs";
import hljs from "./vendor/highlight/core.min.js";
import bash from "./vendor/highlight/languages/bash.min.js";
import c from "./vendor/highlight/languages/c.min.js";
import cpp from "./vendor/highlight/languages/cpp.min.js";
import css from "./vendor/highlight/languages/css.min.js";
import diff from "./vendor/highlight/languages/diff.min.js";
import go from "./vendor/highlight/languages/go.min.js";
import java from "./vendor/highlight/languages/java.min.js";
import javascript from "./vendor/highlight/languages/javascript.min.js";
import json from "./vendor/highlight/languages/json.min.js";
import markdown from "./vendor/highlight/languages/markdown.min.js";
import python from "./vendor/highlight/languages/python.min.js";
import rust from "./vendor/highlight/languages/rust.min.js";
import shell from "./vendor/highlight/languages/shell.min.js";
import sql from "./vendor/highlight/languages/sql.min.js";
import typescript from "./vendor/highlight/languages/typescript.min.js";
import xml from "./vendor/highlight/languages/xml.min.js";
import yaml from "./vendor/highlight/languages/yaml.min.js";

const LANGUAGES = {
  bash, c, cpp, css, diff, go, java, javascript, json, markdown, python, rust, shell, sql,
  typescript, xml, yaml,
};
for (const [name, language] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, language);

const PURIFY = {
  RETURN_TRUSTED_TYPE: true,
  // Inline styles would be refused by the CSP anyway; forms and widgets could pass for the
  // page's own controls; media named by the model are not fetched (an image address can
  // carry what was said to another site).
  FORBID_ATTR: ["style"],
  FORBID_TAGS: [
    "style", "form", "input", "button", "textarea", "select", "dialog",
    "img", "picture", "source", "video", "audio", "track",
  ],
};

// Links from the model open elsewhere and tell the other site nothing.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

export function sanitize(html) {
  return DOMPurify.sanitize(html, PURIFY);
}

function copyButton(code) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.setAttribute("aria-label", "Copy code");
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(code.textContent);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  return button;
}

function highlight(code) {
  const text = code.textContent;
  const named = [...code.classList].find((name) => name.startsWith("language-"));
  const language = named?.slice("language-".length);
  const result = language && hljs.getLanguage(language)
    ? hljs.highlight(text, { language, ignoreIllegals: true })
    : hljs.highlightAuto(text);
  code.innerHTML = sanitize(result.value);
  code.classList.add("hljs");
  const pre = code.parentElement;
  const block = document.createElement("div");
  block.className = "codeblock";
  pre.replaceWith(block);
  block.append(copyButton(code), pre);
}

export function renderMarkdown(target, text) {
  target.innerHTML = sanitize(marked.parse(text ?? "", { async: false, gfm: true }));
  for (const code of target.querySelectorAll("pre > code")) highlight(code);
}

// The JSON in a text, such as a stored tool result after the line the gateway puts first.
export function parseJsonIn(text) {
  for (const start of [0, text.indexOf("{")]) {
    if (start < 0) continue;
    try {
      return { head: text.slice(0, start), value: JSON.parse(text.slice(start)) };
    } catch {
      // not JSON from there
    }
  }
  return null;
}

// Tool arguments and results are shown as text, never as HTML.
export function prettyJson(value) {
  if (typeof value !== "string") return JSON.stringify(value, null, 2);
  const parsed = parseJsonIn(value);
  return parsed ? parsed.head + JSON.stringify(parsed.value, null, 2) : value;
}
