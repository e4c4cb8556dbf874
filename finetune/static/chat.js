// The chat page of `finetune serve`: talks to the same OpenAI-compatible API as any client, streaming
// the answer from /v1/chat/completions as server-sent events. No external scripts: it works offline.
"use strict";
const $ = (id) => document.getElementById(id);
let conversation = [];   // [{role, content}] of the current conversation, system prompt excluded
let controller = null;   // aborts the answer being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(text, isError) {
  $("status").textContent = text || "";
  $("status").className = isError ? "error" : "";
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "assistant" ? "assistant · " + $("model").value : role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("log").append(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    const select = $("model");
    const keep = select.value;
    select.innerHTML = "";
    for (const m of body.data) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.id + (m.kind === "adapter" ? " (adapter)" : "");
      select.append(opt);
    }
    if (keep && [...select.options].some((o) => o.value === keep)) select.value = keep;
    status(body.data.length + " model(s) served");
  } catch (e) {
    status("could not list models: " + e.message, true);
  }
}

function messages() {
  const system = $("system").value.trim();
  return (system ? [{ role: "system", content: system }] : []).concat(conversation);
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  const out = div.querySelector(".text");
  const request = {
    model: $("model").value, messages: messages(), stream: true,
    temperature: Number($("temperature").value), top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  controller = new AbortController();
  $("send").hidden = true; $("stop").hidden = false;
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : r.status + " " + r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {   // one server-sent event per blank-line-ended block
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices.length ? chunk.choices[0].delta.content : "";
          if (delta) { answer += delta; out.textContent = answer; $("log").scrollTop = $("log").scrollHeight; }
        }
      }
    }
    status("");
  } catch (e) {
    if (e.name !== "AbortError") { div.classList.add("error-msg"); out.textContent = answer + (answer ? "\n" : "") + "error: " + e.message; }
  } finally {
    div.classList.remove("streaming");
    div.dataset.done = "1";
    conversation.push({ role: "assistant", content: answer });
    controller = null;
    $("send").hidden = false; $("stop").hidden = true;
  }
}

function transcript() {
  return messages().map((m) => m.role + ": " + m.content).join("\n\n");
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new").addEventListener("click", () => { if (controller) controller.abort(); conversation = []; $("log").innerHTML = ""; status("new conversation"); });
$("copy").addEventListener("click", async () => {
  try { await navigator.clipboard.writeText(transcript()); status("conversation copied"); }
  catch (e) { status("copy failed: " + e.message, true); }
});
$("save").addEventListener("click", () => {
  const blob = new Blob([JSON.stringify({ model: $("model").value, messages: messages() }, null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "conversation-" + new Date().toISOString().replace(/[:.]/g, "-") + ".json";
  a.click();
  URL.revokeObjectURL(a.href);
  status("conversation saved");
});
$("api_key").value = localStorage.getItem("finetune-api-key") || "";
$("api_key").addEventListener("change", () => { localStorage.setItem("finetune-api-key", $("api_key").value.trim()); loadModels(); });
loadModels();
