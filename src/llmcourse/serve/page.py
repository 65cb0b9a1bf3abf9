"""The chat page served at ``/``: static HTML and JavaScript (no CDN) streaming from ``/v1/chat/completions``."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>llmcourse chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; }
  #log { border: 1px solid #ccc; border-radius: 6px; padding: .5rem 1rem; min-height: 12rem; }
  .msg { margin: .6rem 0; white-space: pre-wrap; }
  .user { color: #124; font-weight: 600; }
  .assistant { color: #222; }
  form { display: flex; gap: .5rem; margin-top: .8rem; }
  #input { flex: 1; padding: .5rem; }
  #key { width: 10rem; }
</style>
</head>
<body>
<h1>llmcourse chat</h1>
<div id="log"></div>
<form id="form">
  <input id="input" autocomplete="off" placeholder="Type a message and press Enter">
  <input id="key" type="password" placeholder="API key (if any)">
  <button id="send" type="submit">Send</button>
</form>
<script>
const log = document.getElementById("log");
const messages = [];
function add(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  log.appendChild(div);
  return div;
}
const form = document.getElementById("form");
form.addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = document.getElementById("input");
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  messages.push({role: "user", content: text});
  add("user", text);
  const out = add("assistant", "");
  const headers = {"Content-Type": "application/json"};
  const key = document.getElementById("key").value;
  if (key) headers["Authorization"] = "Bearer " + key;
  const res = await fetch("/v1/chat/completions", {method: "POST", headers,
    body: JSON.stringify({messages, stream: true, max_tokens: 256, temperature: 0.7})});
  if (!res.ok) { out.textContent = "error: " + (await res.text()); return; }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", reply = "";
  while (true) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += decoder.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\\n\\n")) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const chunk = JSON.parse(line.slice(6));
      if (chunk.error) { out.textContent += " [error: " + chunk.error.message + "]"; continue; }
      for (const c of chunk.choices) {
        if (c.delta && c.delta.content) { reply += c.delta.content; out.textContent = reply; }
      }
    }
  }
  out.dataset.done = "1";
  messages.push({role: "assistant", content: reply});
});
// ?q=TEXT types TEXT and sends it (a link that opens a conversation; used by the headless test)
const q = new URLSearchParams(location.search).get("q");
if (q) { document.getElementById("input").value = q; form.requestSubmit(); }
</script>
</body>
</html>
"""
