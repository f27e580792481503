// The chat page: server-side conversations, replies streamed as Server-Sent Events over fetch().
"use strict";

const log = document.getElementById("log");
const form = document.getElementById("form");
const input = document.getElementById("message");
const send = document.getElementById("send");
const personaBox = document.getElementById("persona");
const decoding = document.getElementById("decoding");
const SETTINGS = { default: {}, greedy: { temperature: 0, num_beams: 1 }, sample: { temperature: 0.7, num_beams: 1 } };
const statusLine = document.getElementById("status");
const KEY = "blenderbot-mb-conversation";
let conversation = localStorage.getItem(KEY);

function bubble(kind, text) {
  const div = document.createElement("div");
  div.className = "msg " + kind;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method, headers: { "Content-Type": "application/json" }, body: body && JSON.stringify(body),
  });
  if (!response.ok && response.status !== 404) {
    const error = await response.json().catch(() => ({}));
    throw new Error((error.error && error.error.message) || response.statusText);
  }
  return response;
}

async function restore() {  // show the stored conversation after a reload
  if (!conversation) return;
  const response = await api("GET", "v1/conversations/" + conversation);
  if (response.status === 404) { forget(); return; }
  for (const m of (await response.json()).messages) {
    bubble(m.role === "user" ? "user" : m.role === "system" ? "persona" : "bot",
      m.role === "system" ? "persona: " + m.content : m.content.trim());
  }
}

function forget() { conversation = null; localStorage.removeItem(KEY); }

async function start() {
  const persona = personaBox.value.split("\n").map(s => s.trim()).filter(Boolean);
  const response = await api("POST", "v1/conversations", { persona });
  conversation = (await response.json()).id;
  localStorage.setItem(KEY, conversation);
  for (const line of persona) bubble("persona", "persona: " + line);
}

async function* events(response) {  // the JSON payloads of an SSE stream, until [DONE]
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function say(text) {
  if (!conversation) await start();
  const asked = bubble("user", text);
  const reply = bubble("bot", "");
  reply.classList.add("streaming");
  const body = { content: text, stream: true, ...SETTINGS[decoding.value] };
  let response = await api("POST", `v1/conversations/${conversation}/messages`, body);
  if (response.status === 404) {  // deleted elsewhere: the turns shown are gone; a new conversation starts here
    forget();
    log.replaceChildren();
    bubble("notice", "This conversation was deleted on the server: a new one starts here.");
    await start();  // (its persona lines)
    log.append(asked, reply);
    response = await api("POST", `v1/conversations/${conversation}/messages`, body);
  }
  let textSoFar = "";
  for await (const chunk of events(response)) {
    if (chunk.error) throw new Error(chunk.error.message);
    for (const choice of chunk.choices || []) {
      if (choice.delta && choice.delta.content) {
        textSoFar += choice.delta.content;
        reply.textContent = textSoFar.trimStart();
        log.scrollTop = log.scrollHeight;
      }
    }
  }
  reply.classList.remove("streaming");
  reply.classList.add("done");
}

form.addEventListener("submit", async event => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  send.disabled = true;
  statusLine.textContent = "thinking...";
  try {
    await say(text);
    statusLine.textContent = "";
  } catch (error) {
    bubble("error", String(error.message || error));
    statusLine.textContent = "error";
  } finally {
    send.disabled = false;
    input.focus();
  }
});

document.getElementById("reset").addEventListener("click", async () => {
  if (conversation) await api("DELETE", "v1/conversations/" + conversation).catch(() => {});
  forget();
  log.replaceChildren();
  statusLine.textContent = "new conversation";
  input.focus();
});

restore().catch(error => bubble("error", String(error.message || error)));
