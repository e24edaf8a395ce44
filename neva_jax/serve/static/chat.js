// The neva-jax chat page: pick, paste or drop an image, ask, watch the answer stream in.
// It talks to the server's own OpenAI route (POST /v1/chat/completions, "stream": true)
// and keeps the conversation here, sending the whole history with every question.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // OpenAI messages of this conversation
let pendingImage = null;  // data: URI of the image to send with the next question
let busy = false;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addBubble(role, text, image) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (image) {
    const img = document.createElement("img");
    img.src = image;
    img.alt = "uploaded image";
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function setImage(dataUri) {
  pendingImage = dataUri;
  $("preview").hidden = !dataUri;
  $("preview-img").src = dataUri || "";
}

function readImage(file) {
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result);
  reader.readAsDataURL(file);
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return "HTTP " + resp.status;
  }
}

// Reads an SSE body and calls onEvent(parsed JSON) for every `data:` line but [DONE].
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (busy || (!text && !pendingImage)) return;
  const content = [];
  if (pendingImage) content.push({ type: "image_url", image_url: { url: pendingImage } });
  if (text) content.push({ type: "text", text: text });
  const message = { role: "user", content: content };
  addBubble("user", text, pendingImage);
  $("prompt").value = "";
  setImage(null);

  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history, message);
  const body = {
    messages: messages,
    stream: true,
    max_tokens: parseInt($("max-tokens").value, 10) || 256,
    temperature: parseFloat($("temperature").value) || 0,
  };
  const bubble = addBubble("assistant", "");
  bubble.dataset.state = "streaming";
  const out = bubble.querySelector(".text");
  busy = true;
  $("send").disabled = true;
  $("status").textContent = "thinking…";
  const started = performance.now();
  let firstToken = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body),
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    let finish = null;
    await readEvents(resp, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        const piece = (choice.delta && choice.delta.content) || "";
        if (piece && firstToken === null) firstToken = performance.now();
        out.textContent += piece;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      $("messages").scrollTop = $("messages").scrollHeight;
    });
    history.push(message, { role: "assistant", content: out.textContent });
    const ttft = firstToken === null ? "" : `first token ${Math.round(firstToken - started)} ms, `;
    $("status").textContent = `${ttft}done in ${Math.round(performance.now() - started)} ms (${finish})`;
    bubble.dataset.state = "done";
  } catch (e) {
    bubble.remove();
    addBubble("error", String(e.message || e)).dataset.state = "done";
    $("status").textContent = "";
  } finally {
    busy = false;
    $("send").disabled = false;
  }
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (resp.ok) {
      const body = await resp.json();
      $("model").textContent = body.data[0].id + " · context " + body.data[0].max_model_len;
    } else if (resp.status === 401) {
      $("model").textContent = "(enter the API key under Settings)";
    }
  } catch (e) { /* the server is down: the first question will say so */ }
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
$("file").addEventListener("change", (e) => { readImage(e.target.files[0]); e.target.value = ""; });
$("remove-image").addEventListener("click", () => setImage(null));
document.addEventListener("paste", (e) => {
  for (const item of e.clipboardData.items) {
    if (item.type.startsWith("image/")) readImage(item.getAsFile());
  }
});
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => {
  e.preventDefault();
  readImage(e.dataTransfer.files[0]);
});
$("new-chat").addEventListener("click", () => {
  history.length = 0;
  $("messages").replaceChildren();
  $("status").textContent = "";
  setImage(null);
});
$("api-key").value = sessionStorage.getItem("neva-api-key") || "";
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("neva-api-key", $("api-key").value.trim());
  loadModel();
});
loadModel();
