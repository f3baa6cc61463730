// The chat page of `nvila serve`: multi-turn chat over the server's own OpenAI-compatible API.
//
// On load it asks GET v1/models for the served model id; a 401 there (or later) means the server was started
// with --api-key, and the page asks for the key, keeps it in sessionStorage and sends it as a Bearer token.
// Each turn POSTs the whole conversation to v1/chat/completions with stream: true and appends the SSE
// `data:` deltas to the answer as they arrive. Attachments travel as data: URLs in image_url / video_url
// parts (the server always accepts those). Stop aborts the fetch; the server sees the closed connection
// and stops generating for it. Text is only ever set with textContent: answers are never parsed as HTML.
"use strict";

const KEY_STORAGE = "nvila-api-key";
const MAX_FILE_BYTES = 36 * 2 ** 20;  // base64 grows data by 4/3: keeps one file under the server's 48 MiB body limit
const VIDEO_EXTENSIONS = /\.(mp4|m4v|mov|avi|mkv|webm|mpe?g|wmv|flv|3gp)$/i;
const IMAGE_EXTENSIONS = /\.(png|jpe?g|gif|bmp|webp|tiff?)$/i;

const $ = (id) => document.getElementById(id);
const state = {
  model: null,                                   // the served model id, from v1/models
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  history: [],                                   // the OpenAI messages of the finished turns
  attachments: [],                               // [{kind: "image" | "video", name, url}] for the next turn
  controller: null,                              // the AbortController of the turn in flight
};

// ---- talking to the server ---------------------------------------------------------------------------
class ServerError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function errorOf(response) {
  // the server's errors are OpenAI's JSON: {"error": {"message", "type", "param", "code"}}
  let message = `HTTP ${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  return new ServerError(message, response.status);
}

async function connect() {
  const response = await fetch("v1/models", { headers: headers() });
  if (response.status === 401) {
    const error = await errorOf(response);
    askForKey(state.key ? error.message : "");
    $("model").textContent = "API key required";
    return;
  }
  if (!response.ok) throw await errorOf(response);
  const body = await response.json();
  state.model = body.data[0].id;
  $("model").textContent = `model: ${state.model}`;
  $("auth").hidden = true;
}

// POST the conversation and call onDelta(text) per streamed piece; resolves to the finish reason.
async function streamCompletion(messages, signal, onDelta) {
  const body = {
    model: state.model,
    messages,
    stream: true,
    temperature: Number($("temperature").value),
    max_tokens: Math.max(1, Math.round(Number($("max-tokens").value)) || 1),
  };
  if ($("json-mode").checked) body.response_format = { type: "json_object" };
  const response = await fetch("v1/chat/completions",
                               { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop();                        // an incomplete line waits for the next read
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;   // blank separators, comments
      const data = line.slice(5).trim();
      if (data === "[DONE]") return finish;
      const event = JSON.parse(data);
      if (event.error) throw new ServerError(event.error.message || "generation failed", 500);
      const choice = event.choices && event.choices[0];
      if (!choice) continue;                     // the usage chunk
      if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  }
  return finish;
}

// ---- the transcript ------------------------------------------------------------------------------------
function addMessage(role, text, media = []) {
  $("empty").hidden = true;
  const article = document.createElement("article");
  article.className = `msg ${role}`;
  article.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
  if (media.length) {
    const box = document.createElement("div");
    box.className = "media";
    for (const item of media) box.append(preview(item));
    article.append(box);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  const note = document.createElement("div");
  note.className = "note";
  article.append(body, note);
  $("transcript").append(article);
  article.scrollIntoView({ block: "end" });
  return article;
}

// Set an answer's text, keeping the transcript scrolled to the end if it was there (not if the reader scrolled up).
function showText(el, text) {
  const box = $("transcript");
  const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  el.textContent = text;
  if (atEnd) box.scrollTop = box.scrollHeight;
}

function preview(item) {
  const el = document.createElement(item.kind === "video" ? "video" : "img");
  el.src = item.url;
  if (item.kind === "video") { el.controls = true; el.muted = true; el.preload = "metadata"; }
  else el.alt = item.name;
  el.title = item.name;
  return el;
}

function userMessage(text, attachments) {
  if (!attachments.length) return { role: "user", content: text };
  const parts = attachments.map((a) => a.kind === "video"
    ? { type: "video_url", video_url: { url: a.url } }
    : { type: "image_url", image_url: { url: a.url } });
  if (text) parts.push({ type: "text", text });
  return { role: "user", content: parts };
}

// ---- one turn ------------------------------------------------------------------------------------------
async function send() {
  const text = $("prompt").value.trim();
  const attachments = state.attachments;
  if (state.controller || (!text && !attachments.length)) return;
  if (!state.model) {
    showError(state.key || $("auth").hidden ? "not connected to the server yet" : "enter the API key first");
    return;
  }
  showError("");
  const message = userMessage(text, attachments);
  addMessage("user", text, attachments);
  $("prompt").value = "";
  setAttachments([]);
  const answer = addMessage("assistant", "");
  const out = answer.querySelector(".text"), note = answer.querySelector(".note");
  answer.dataset.state = "streaming";
  answer.dataset.deltas = "0";
  state.controller = new AbortController();
  setBusy(true);
  let reply = "", deltas = 0, frame = 0;
  const render = () => { frame = 0; showText(out, reply); answer.dataset.deltas = String(deltas); };
  try {
    const finish = await streamCompletion([...state.history, message], state.controller.signal, (piece) => {
      // the DOM is updated once per frame, however fast deltas come: reading the stream (and Stop) never
      // waits behind layout work that grows with the answer
      reply += piece;
      deltas += 1;
      frame = frame || requestAnimationFrame(render);
    });
    cancelAnimationFrame(frame);
    render();
    answer.dataset.state = "done";
    if (finish === "length") note.textContent = "stopped at the max-tokens limit";
    state.history.push(message, { role: "assistant", content: reply });
  } catch (error) {
    cancelAnimationFrame(frame);
    render();
    if (error.name === "AbortError") {
      answer.dataset.state = "stopped";
      note.textContent = "stopped";
      state.history.push(message, { role: "assistant", content: reply });   // keep what was said so far
    } else {
      // the turn is not part of the conversation: its text and files go back to the composer for a retry
      answer.dataset.state = "error";
      note.textContent = error.message;
      $("prompt").value = text;
      setAttachments(attachments);
      if (error.status === 401) askForKey(error.message);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  if (!busy) $("prompt").focus();
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.history = [];
  setAttachments([]);
  showError("");
  for (const el of [...$("transcript").querySelectorAll(".msg")]) el.remove();
  $("empty").hidden = false;
  $("prompt").focus();
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// ---- the API key ---------------------------------------------------------------------------------------
function askForKey(message) {
  $("auth").hidden = false;
  $("auth-message").textContent = message;
  $("api-key").focus();
}

async function useKey(event) {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  sessionStorage.setItem(KEY_STORAGE, state.key);
  $("auth-message").textContent = "";
  try { await connect(); } catch (error) { $("auth-message").textContent = error.message; }
}

// ---- attachments ---------------------------------------------------------------------------------------
function kindOf(file) {
  if (file.type.startsWith("image/") || (!file.type && IMAGE_EXTENSIONS.test(file.name))) return "image";
  if (file.type.startsWith("video/") || VIDEO_EXTENSIONS.test(file.name)) return "video";
  return null;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  const added = [], refused = [];
  for (const file of files) {
    const kind = kindOf(file);
    if (!kind) { refused.push(`${file.name}: not an image or a video`); continue; }
    if (file.size > MAX_FILE_BYTES) { refused.push(`${file.name}: over ${MAX_FILE_BYTES / 2 ** 20} MiB`); continue; }
    added.push({ kind, name: file.name, url: await readAsDataURL(file) });
  }
  setAttachments([...state.attachments, ...added]);
  showError(refused.join("; "));
}

function setAttachments(list) {
  state.attachments = list;
  const box = $("attachments");
  box.replaceChildren();
  list.forEach((item, i) => {
    const wrap = document.createElement("div");
    wrap.className = "attachment";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${item.name}`);
    remove.addEventListener("click", () => setAttachments(state.attachments.filter((_, j) => j !== i)));
    wrap.append(preview(item), remove);
    box.append(wrap);
  });
}

// ---- wiring --------------------------------------------------------------------------------------------
function init() {
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
    if (event.key === "Escape") stop();
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("auth").addEventListener("submit", useKey);
  $("file").addEventListener("change", async (event) => {
    await addFiles([...event.target.files]);
    event.target.value = "";                     // choosing the same file again fires change again
  });
  let depth = 0;                                 // dragenter/dragleave also fire for every child element
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; document.body.classList.remove("dragging"); } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    document.body.classList.remove("dragging");
    if (e.dataTransfer && e.dataTransfer.files.length) addFiles([...e.dataTransfer.files]);
  });
  $("api-key").value = state.key;
  connect().catch((error) => { $("model").textContent = "not connected"; showError(error.message); });
  $("prompt").focus();
}

init();
