// vlbot web chat: no build step, no dependencies. Talks to the same server's OpenAI-compatible API.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), promptBox = $("prompt"), sendButton = $("send"), pending = $("pending");
let attachments = []; // {dataUrl, name}
let busy = false;

function randomId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function conversationId() {
  let id = localStorage.getItem("vlbot.conversation");
  if (!id) {
    id = randomId();
    localStorage.setItem("vlbot.conversation", id);
  }
  return id;
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = localStorage.getItem("vlbot.apiKey");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, options, retried) {
  const response = await fetch(path, Object.assign({}, options, { headers: headers(options && options.headers) }));
  if (response.status === 401 && !retried) {
    const key = window.prompt("This server needs an API key:");
    if (key) {
      localStorage.setItem("vlbot.apiKey", key.trim());
      return api(path, options, true);
    }
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "The server answered " + response.status + ".";
}

function scrollDown() { log.scrollTop = log.scrollHeight; }

function addMessage(role, text, images) {
  $("empty").hidden = true;
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (images && images.length) {
    const row = document.createElement("div");
    row.className = "images";
    for (const src of images) {
      const img = document.createElement("img");
      img.src = src;
      img.alt = "image";
      row.appendChild(img);
    }
    div.appendChild(row);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text || "";
  div.appendChild(body);
  log.appendChild(div);
  scrollDown();
  return div;
}

function addCopy(div) {
  const tools = document.createElement("div");
  tools.className = "tools";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.addEventListener("click", async () => {
    const text = div.querySelector(".text").textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch (e) {
      const area = document.createElement("textarea");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  tools.appendChild(button);
  div.appendChild(tools);
}

function showError(div, message) {
  div.classList.add("error");
  const body = div.querySelector(".text");
  body.classList.remove("thinking");
  body.textContent = message;
}

async function loadHistory() {
  const response = await api("/v1/conversations/" + encodeURIComponent(conversationId()));
  if (!response.ok) return;
  const data = await response.json();
  for (const turn of data.turns) {
    const texts = turn.parts.filter((p) => p.text !== undefined).map((p) => p.text);
    const images = turn.parts.filter((p) => p.url).map((p) => p.url);
    const div = addMessage(turn.role, texts.join("\n"), images);
    if (turn.role === "assistant") addCopy(div);
  }
}

async function loadModel() {
  try {
    const response = await fetch("/health");
    const data = await response.json();
    $("model").textContent = data.model + (data.status === "healthy" ? "" : " (" + data.status + ")");
  } catch (e) { /* optional */ }
}

function renderPending() {
  pending.replaceChildren();
  pending.hidden = attachments.length === 0;
  attachments.forEach((item, index) => {
    const box = document.createElement("div");
    box.className = "thumb";
    const img = document.createElement("img");
    img.src = item.dataUrl;
    img.alt = item.name || "image";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "Remove";
    remove.addEventListener("click", () => { attachments.splice(index, 1); renderPending(); });
    box.append(img, remove);
    pending.appendChild(box);
  });
}

function addFiles(files) {
  for (const file of files) {
    if (file.type && !file.type.startsWith("image/")) {
      addMessage("assistant", "“" + file.name + "” is not an image.").classList.add("error");
      continue;
    }
    const reader = new FileReader();
    reader.onload = () => { attachments.push({ dataUrl: reader.result, name: file.name }); renderPending(); };
    reader.readAsDataURL(file);
  }
}

function parseEvents(buffer, onData) {
  let index;
  while ((index = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, index);
    buffer = buffer.slice(index + 2);
    for (const line of block.split("\n")) {
      if (line.startsWith("data: ")) onData(line.slice(6));
    }
  }
  return buffer;
}

async function send(event, preset) {
  event.preventDefault();
  const question = promptBox.value.trim();
  if (busy || (!question && attachments.length === 0 && !preset)) return;
  busy = true;
  sendButton.disabled = true;
  const images = attachments.map((a) => a.dataUrl);
  const content = [];
  if (question) content.push({ type: "text", text: question });
  for (const url of images) content.push({ type: "image_url", image_url: { url } });
  addMessage("user", preset ? `[${preset}] ${question}`.trim() : question, images);
  promptBox.value = "";
  attachments = [];
  renderPending();
  const answer = addMessage("assistant", "thinking…");
  const body = answer.querySelector(".text");
  body.classList.add("thinking");
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: "vlbot", stream: true, conversation_id: conversationId(),
        messages: [{ role: "user", content: content.length ? content : preset }],
        ...(preset ? { preset } : {}),
      }),
    });
    if (!response.ok) {
      showError(answer, await errorText(response));
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", text = "", failed = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), (data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          failed = true;
          showError(answer, chunk.error.message);
          return;
        }
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          text += delta.content;
          body.classList.remove("thinking");
          body.textContent = text;
          scrollDown();
        }
      });
    }
    if (!failed) {
      body.classList.remove("thinking");
      body.textContent = text.trim();
      addCopy(answer);
    }
  } catch (e) {
    showError(answer, "Connection lost: " + e.message);
  } finally {
    busy = false;
    sendButton.disabled = false;
    promptBox.focus();
  }
}

$("composer").addEventListener("submit", (e) => send(e));
document.querySelectorAll("[data-preset]").forEach((button) => {
  button.addEventListener("click", (e) => send(e, button.dataset.preset));
});
promptBox.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
});
$("file").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
document.addEventListener("paste", (e) => {
  const files = Array.from(e.clipboardData.items).filter((i) => i.kind === "file").map((i) => i.getAsFile());
  if (files.length) { e.preventDefault(); addFiles(files); }
});
let dragDepth = 0;
document.addEventListener("dragenter", (e) => { e.preventDefault(); dragDepth++; $("drop").hidden = false; });
document.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; $("drop").hidden = true; } });
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  $("drop").hidden = true;
  addFiles(e.dataTransfer.files);
});
$("new-chat").addEventListener("click", () => {
  localStorage.setItem("vlbot.conversation", randomId());
  log.querySelectorAll(".msg").forEach((m) => m.remove());
  $("empty").hidden = false;
});

loadModel();
loadHistory();
