// selflearn chat page: plain JavaScript, no build step. Model output is only ever inserted as text
// (textContent / Text nodes), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { conversationId: null, busy: false };

function headers() {
  return selflearnKey.headers({ "Content-Type": "application/json" });  // key.js
}

function showError(text) {
  const el = $("error");
  el.textContent = text || "";
  el.hidden = !text;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.append(body);
  $("log").append(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function setServed(checkpoint) {
  if (checkpoint) $("served").textContent = `checkpoint: ${checkpoint}`;
}

async function refreshServed() {
  try {
    const r = await fetch("/readyz");
    const body = await r.json();
    setServed(body.checkpoint);
    if (body.degraded) $("served").title = "the newest checkpoint failed to load; serving the previous one";
  } catch (e) { /* the next poll will tell */ }
}

// `selflearn local` serves its learning dashboard beside the chat; plain `selflearn serve` does not.
async function showDashboardLink() {
  try {
    const r = await fetch("/dashboard/", { method: "HEAD" });
    if (r.ok) $("dashboard-link").hidden = false;
  } catch (e) { /* no dashboard: the link stays hidden */ }
}

function addMeta(div, info) {
  const meta = document.createElement("div");
  meta.className = "meta";
  const ck = document.createElement("span");
  ck.className = "checkpoint";
  ck.textContent = info.checkpoint || "";
  meta.append(ck);
  if (info.sources && info.sources.length) {
    // What the answer read in the checkpoint's memory: a link per article (http(s) only: a
    // source's url is data, never script), titled with the checkpoint that learned it.
    const src = document.createElement("span");
    src.className = "sources";
    src.append(document.createTextNode("sources: "));
    info.sources.forEach((s, i) => {
      if (i) src.append(document.createTextNode(", "));
      const safe = /^https?:\/\//i.test(s.url || "");
      const a = document.createElement(safe ? "a" : "span");
      if (safe) { a.href = s.url; a.target = "_blank"; a.rel = "noopener noreferrer"; }
      a.textContent = s.title;
      a.title = `learned in ${s.checkpoint}`;
      src.append(a);
    });
    meta.append(src);
  }
  if (info.usage) {
    const u = document.createElement("span");
    u.textContent = `${info.usage.completion_tokens} tokens · ${info.finish_reason}`;
    meta.append(u);
  }
  if (info.response_id) {
    for (const [rating, label] of [["up", "👍"], ["down", "👎"]]) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = label;
      b.title = rating === "up" ? "good answer" : "bad answer (you can suggest a correction)";
      b.setAttribute("aria-pressed", "false");
      b.addEventListener("click", () => sendFeedback(info, rating, b));
      meta.append(b);
    }
  }
  div.append(meta);
}

async function sendFeedback(info, rating, button) {
  // The answer goes back with its (signed) id, so any server replica can accept the feedback.
  const body = { rating, response_id: info.response_id, conversation_id: info.conversation_id,
                 prompt: info.prompt, reply: info.reply, checkpoint: info.checkpoint };
  if (rating === "down") {
    const correction = window.prompt("Optional: what should the answer have been?");
    if (correction && correction.trim()) body.correction = correction.trim();
  }
  const r = await fetch("/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!r.ok) {
    showError(await errorText(r));
    return;
  }
  const stored = await r.json();
  button.setAttribute("aria-pressed", "true");
  const meta = button.parentElement;
  let note = meta.querySelector(".thanks");
  if (!note) {
    note = document.createElement("span");
    note.className = "thanks";
    meta.append(note);
  }
  note.textContent = `thanks, ${stored.learn} (feedback ${stored.id})`;
}

async function errorText(r) {
  try {
    const body = await r.json();
    return `${r.status}: ${(body.error && body.error.message) || JSON.stringify(body)}`;
  } catch (e) {
    return `${r.status} ${r.statusText}`;
  }
}

function number(id, parse) {
  const v = parse($(id).value);
  return Number.isFinite(v) ? v : undefined;
}

async function send(message) {
  state.busy = true;
  $("send").disabled = true;
  showError("");
  bubble("user", message);
  const div = bubble("assistant", "");
  div.classList.add("streaming");
  const textEl = div.querySelector(".text");
  const payload = {
    message,
    temperature: number("temperature", parseFloat),
    top_p: number("top_p", parseFloat),
    top_k: number("top_k", (v) => parseInt(v, 10)),
    max_length: number("max_length", (v) => parseInt(v, 10)),
  };
  if (state.conversationId) payload.conversation_id = state.conversationId;
  let info = { prompt: message };
  try {
    const r = await fetch("/chat/stream", { method: "POST", headers: headers(), body: JSON.stringify(payload) });
    if (!r.ok) throw new Error(await errorText(r));
    setServed(r.headers.get("X-Model-Checkpoint"));
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (!data) continue;
        const ev = JSON.parse(data);
        if (event === "start") {
          info = { ...info, ...ev };
          state.conversationId = ev.conversation_id;
          setServed(ev.checkpoint);
        } else if (event === "token") {
          textEl.append(document.createTextNode(ev.text));
          $("log").scrollTop = $("log").scrollHeight;
        } else if (event === "done") {
          info = { ...info, ...ev };
          textEl.textContent = ev.reply;
        } else if (event === "error") {
          throw new Error(`${ev.status}: ${ev.message}`);
        }
      }
    }
  } catch (e) {
    showError(e.message);
  } finally {
    div.classList.remove("streaming");
    addMeta(div, info);
    state.busy = false;
    $("send").disabled = false;
  }
}

function init() {
  selflearnKey.bind($("api-key"));
  for (const id of ["temperature", "top_p"]) {
    $(id).addEventListener("input", () => { $(`${id}-value`).textContent = $(id).value; });
  }
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const message = $("message").value.trim();
    if (!message || state.busy) return;
    $("message").value = "";
    send(message);
  });
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("new-chat").addEventListener("click", () => {
    state.conversationId = null;
    $("log").replaceChildren();
    showError("");
  });
  refreshServed();
  showDashboardLink();
  setInterval(refreshServed, 15000);
}

document.addEventListener("DOMContentLoaded", init);
