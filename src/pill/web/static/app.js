// The PILL demo page: upload an image (and an input of each other modality the model reads), ask
// questions, read the answer as it streams in.
// The server checks everything again; the checks here only save a round trip.
"use strict";

const $ = (id) => document.getElementById(id);
// inputs: modality name -> id of its upload on the server; modalities: name -> {label, max_upload_bytes, ...}
const state = { info: null, inputs: {}, modalities: {}, history: [], busy: false, abort: null };
const capitalised = (text) => text.charAt(0).toUpperCase() + text.slice(1);

// ---- messages ---------------------------------------------------------------------------
function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}
function setStatus(message) { $("status").textContent = message || ""; }
function showNotice(message) {
  const box = $("notice");
  box.textContent = message || "";
  box.hidden = !message;
}
function formatCount(n) { return n.toLocaleString("en-US"); }
function formatMB(bytes) {
  return bytes < 1048576 ? (bytes / 1024).toFixed(1) + " KB" : (bytes / 1048576).toFixed(1) + " MB";
}

// ---- model info and settings ------------------------------------------------------------
async function loadInfo() {
  const resp = await fetch("/api/info");
  const info = await resp.json();
  state.info = info;
  $("info-llm").textContent = info.llm;
  $("info-vpg").textContent = info.vpg;
  $("info-run").textContent = info.run_dir || "none (embedded default)";
  $("info-stages").textContent = info.stages.length ? info.stages.join(", ") : "none (untrained plug-ins)";
  const badge = $("model-badge");
  badge.textContent = info.trained ? `run ${info.run_dir}` : "untrained plug-ins";
  badge.classList.toggle("untrained", !info.trained);
  $("untrained-banner").hidden = info.trained;

  const body = document.querySelector("#param-table tbody");
  body.replaceChildren();
  for (const row of info.parameters) {
    const tr = document.createElement("tr");
    if (row.part === "total") tr.className = "total";
    for (const v of [row.part, formatCount(row.parameters), formatCount(row.trainable)]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.append(td);
    }
    body.append(tr);
  }
  if (info.gate_plot) {
    $("gate-plot").src = "/api/gates.png";
    $("gates").hidden = false;
  }

  const s = info.settings;
  for (const [id, name] of [["max-new-tokens", "max_new_tokens"], ["temperature", "temperature"], ["top-p", "top_p"]]) {
    const input = $(id);
    input.min = s[name].min;
    input.max = s[name].max;
    input.value = s[name].default;
  }
  $("greedy").checked = s.greedy.default;
  syncSampling();
  $("question").maxLength = info.limits.max_question_chars;
  for (const m of info.modalities) state.modalities[m.name] = m;
  const image = state.modalities.image;
  $("drop-zone").hidden = $("examples").hidden = !image;
  setupOtherInputs(info.modalities.filter((m) => m.name !== "image"));
  $("limits-note").textContent =
    (image ? `Up to ${formatMB(image.max_upload_bytes)} and ${formatCount(info.limits.max_pixels)} pixels.` : "")
    + (info.limits.context_tokens ? ` The model reads at most ${formatCount(info.limits.context_tokens)} tokens:`
       + " beyond that the oldest turns of a conversation are left out." : "");
}

function syncSampling() {
  const greedy = $("greedy").checked;
  $("temperature").disabled = greedy;
  $("top-p").disabled = greedy;
}

function readSettings() {
  const s = state.info.settings;
  const out = { greedy: $("greedy").checked };
  for (const [id, name, label, whole] of [["max-new-tokens", "max_new_tokens", "Max new tokens", true],
                                          ["temperature", "temperature", "Temperature", false],
                                          ["top-p", "top_p", "Top-p", false]]) {
    const value = Number($(id).value);
    if ($(id).value === "" || !Number.isFinite(value) || (whole && !Number.isInteger(value))
        || value < s[name].min || value > s[name].max) {
      throw new Error(`${label} must be ${whole ? "a whole number " : ""}between ${s[name].min} and ${s[name].max}.`);
    }
    out[name] = value;
  }
  return out;
}

// ---- inputs -----------------------------------------------------------------------------
// One file of modality `name` (default: the image) -> the server decodes it with that modality's
// loader and keeps it; a new input starts a new conversation.
async function useFile(file, suggestedQuestion, name = "image") {
  showError("");
  const m = state.modalities[name];
  const limit = m.max_upload_bytes;
  const previous = state.inputs[name] ? ` The previous ${m.label} is still in use.` : "";
  if (file.size > limit) {
    showError(`${file.name}: the file is ${formatMB(file.size)}; the limit is ${formatMB(limit)}.${previous}`);
    return;
  }
  setStatus(`Uploading ${file.name}…`);
  let reply;
  const family = m.accept ? m.accept.replace("*", "") : null;
  try {
    const resp = await fetch(`/api/upload/${encodeURIComponent(name)}`, {
      method: "POST", body: file,
      headers: { "Content-Type": family && file.type && file.type.startsWith(family) ? file.type : "application/octet-stream",
                 "X-File-Name": encodeURIComponent(file.name).slice(0, 200) },
    });
    reply = await resp.json().catch(() => ({ error: `the server answered ${resp.status}` }));
    if (!resp.ok) throw new Error(reply.error || `the server answered ${resp.status}`);
  } catch (err) {
    setStatus("");
    const message = err.message.startsWith(file.name) ? err.message : `${file.name}: ${err.message}`;
    showError(message + "." + previous);
    return;  // the previous input, if any, stays in place
  }
  stopAnswer();
  state.inputs[name] = reply.input_id;
  const summary = reply.summary ? ` (${reply.summary})` : "";
  if (name === "image") {
    const preview = $("preview");
    if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    preview.dataset.imageId = reply.input_id;
    $("image-caption").textContent = `${file.name}` + (reply.summary ? ` · ${reply.summary}` : "");
  } else {
    const caption = $(`caption-${name}`);
    caption.textContent = `${file.name}${summary}`;
    caption.dataset.inputId = reply.input_id;
  }
  clearConversation();
  setStatus(`${capitalised(m.label)}: ${file.name}${summary}. Ask a question about it.`);
  if (suggestedQuestion) $("question").value = suggestedQuestion;
  $("question").focus();
}

async function loadExamples() {
  const resp = await fetch("/examples/examples.json");
  if (!resp.ok) return;
  for (const ex of await resp.json()) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "example";
    button.title = ex.question;
    button.dataset.file = ex.file;
    const img = document.createElement("img");
    img.src = "/examples/" + ex.file;
    img.alt = ex.file.replace(".png", "").replace("-", " ");
    button.append(img);
    button.addEventListener("click", async () => {
      const blob = await (await fetch("/examples/" + ex.file)).blob();
      await useFile(new File([blob], ex.file, { type: "image/png" }), ex.question);
    });
    $("examples").append(button);
  }
}

// A file chooser and a caption for each modality besides the image.
function setupOtherInputs(list) {
  const box = $("other-inputs");
  box.replaceChildren();
  box.hidden = !list.length;
  for (const m of list) {
    const row = document.createElement("div");
    row.className = "input-row";
    const label = document.createElement("label");
    label.htmlFor = `file-input-${m.name}`;
    label.textContent = `${capitalised(m.label)} (up to ${formatMB(m.max_upload_bytes)}):`;
    const input = document.createElement("input");
    input.type = "file";
    input.id = `file-input-${m.name}`;
    input.dataset.modality = m.name;
    if (m.accept) input.accept = m.accept;
    input.addEventListener("change", (e) => {
      if (e.target.files.length) useFile(e.target.files[0], null, m.name);
      e.target.value = "";
    });
    const caption = document.createElement("span");
    caption.id = `caption-${m.name}`;
    caption.className = "small";
    row.append(label, input);
    if (m.accept === "audio/*") row.append(recordButton(m));
    row.append(caption);
    box.append(row);
  }
}

// ---- recording ----------------------------------------------------------------------------
// "Record" captures the microphone (the browser asks first; it allows that on https and on
// 127.0.0.1 / localhost pages) into a 16-bit mono WAV file at the browser's own rate, which the
// server resamples; it is then uploaded like a chosen file. A recording stops at the encoder's
// length limit, or when "Stop" is pressed.
const DEFAULT_RECORD_SECONDS = 30;

function recordButton(m) {
  const button = document.createElement("button");
  button.type = "button";
  button.id = `record-${m.name}`;
  button.className = "secondary record";
  button.textContent = "Record";
  const seconds = m.max_seconds || DEFAULT_RECORD_SECONDS;
  let session = null;
  const reset = () => { session = null; button.textContent = "Record"; button.classList.remove("recording"); };
  button.addEventListener("click", async () => {
    if (session) { session.stop(); return; }
    showError("");
    if (!navigator.mediaDevices?.getUserMedia || !window.AudioWorkletNode) {
      showError("Recording needs microphone access, which this browser allows only on https or 127.0.0.1 / "
                + `localhost pages. Choose an audio file instead.`);
      return;
    }
    session = { stop: () => {} };  // a second click while the microphone opens does nothing
    try {
      session = await startRecording(seconds, (file) => {
        reset();
        if (!file) {
          setStatus("");
          showError("The recording is empty: no sound came from the microphone.");
          return;
        }
        useFile(file, null, m.name);
      });
    } catch (err) {
      reset();
      setStatus("");
      const why = err.name === "NotAllowedError" ? "microphone access was refused"
        : err.name === "NotFoundError" ? "no microphone was found" : (err.message || err.name);
      showError(`Recording did not start: ${why}. Choose an audio file instead.`);
      return;
    }
    button.textContent = "Stop";
    button.classList.add("recording");
    setStatus(`Recording… press Stop to finish (at most ${seconds} s).`);
  });
  return button;
}

// Microphone -> Float32 chunks (an AudioWorklet) until stop() or `maxSeconds`; then
// done(File "recording.wav"), or done(null) when nothing was recorded.
async function startRecording(maxSeconds, done) {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
  let ctx, source, node;
  try {
    ctx = new AudioContext();
    await ctx.audioWorklet.addModule("/static/recorder-worklet.js");
    source = ctx.createMediaStreamSource(stream);
    node = new AudioWorkletNode(ctx, "pill-recorder");
  } catch (err) {
    stream.getTracks().forEach((t) => t.stop());
    if (ctx) ctx.close();
    throw err;
  }
  const limit = Math.round(maxSeconds * ctx.sampleRate);
  const chunks = [];
  let length = 0, stopped = false, timer = null;
  const stop = () => {
    if (stopped) return;
    stopped = true;
    clearTimeout(timer);
    source.disconnect();
    node.disconnect();
    stream.getTracks().forEach((t) => t.stop());
    const rate = ctx.sampleRate;
    ctx.close();
    const n = Math.min(length, limit);
    done(n ? new File([encodeWav(chunks, n, rate)], "recording.wav", { type: "audio/wav" }) : null);
  };
  node.port.onmessage = (e) => {
    if (stopped) return;
    chunks.push(e.data);
    length += e.data.length;
    if (length >= limit) stop();
  };
  source.connect(node);
  node.connect(ctx.destination);  // the node writes no output (silence); the connection keeps it running
  timer = setTimeout(stop, maxSeconds * 1000 + 1000);  // in case the audio thread stalls
  return { stop };
}

// Float32 chunks -> the bytes of a mono 16-bit PCM WAV file of the first `n` samples.
function encodeWav(chunks, n, rate) {
  const view = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (at, s) => { for (let i = 0; i < s.length; i++) view.setUint8(at + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * n, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true);
  text(36, "data"); view.setUint32(40, 2 * n, true);
  let at = 44, left = n;
  for (const chunk of chunks) {
    for (let i = 0; i < chunk.length && left > 0; i++, left--, at += 2) {
      const x = Math.max(-1, Math.min(1, chunk[i]));
      view.setInt16(at, x < 0 ? x * 0x8000 : x * 0x7fff, true);
    }
  }
  return view.buffer;
}

function setupDrop() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (e) => {
    if (e.target.files.length) useFile(e.target.files[0]);
    e.target.value = "";  // choosing the same file again fires change again
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("dragover"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("dragover"));
  }
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer.files.length) useFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) useFile(file);
  });
}

// ---- conversation -----------------------------------------------------------------------
function addTurn(role, text) {
  const li = document.createElement("li");
  li.className = `turn ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "PILL";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  $("conversation").append(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

function clearConversation() {
  state.history = [];
  $("conversation").replaceChildren();
}

function stopAnswer() {
  if (state.abort) state.abort.abort();
}

function setBusy(busy) {
  state.busy = busy;
  $("ask").disabled = busy;
}

// Server-sent events over a POST: parse "event: X\ndata: JSON\n\n" blocks as they arrive.
async function* readEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
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
      yield { event, data: data ? JSON.parse(data) : null };
    }
  }
}

async function ask(e) {
  e.preventDefault();
  if (state.busy) return;
  showError("");
  showNotice("");
  const question = $("question").value.trim();
  if (!question) { showError("Type a question first."); return; }
  let settings;
  try { settings = readSettings(); } catch (err) { showError(err.message); return; }

  setBusy(true);
  addTurn("user", question);
  const turn = addTurn("assistant", "");
  const text = turn.querySelector(".text");
  turn.dataset.state = "streaming";
  $("question").value = "";
  const controller = new AbortController();
  state.abort = controller;
  let answer = null, failure = null;
  setStatus("Thinking…");
  try {
    const resp = await fetch("/api/chat", {
      method: "POST", signal: controller.signal, headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ question, inputs: state.inputs, history: state.history, settings }),
    });
    if (!resp.ok) {
      const reply = await resp.json().catch(() => ({}));
      throw new Error(reply.error || `the server answered ${resp.status}`);
    }
    for await (const { event, data } of readEvents(resp)) {
      if (event === "queued") setStatus(`Waiting: the model is answering another question (${data.ahead} ahead)…`);
      else if (event === "start") setStatus("Answering…");
      else if (event === "notice") showNotice(data.message);
      else if (event === "token") text.textContent += text.textContent ? data : data.trimStart();
      else if (event === "done") answer = data.answer;
      else if (event === "error") throw new Error(data.message);
    }
    if (answer === null) throw new Error("the connection closed before the answer was complete");
  } catch (err) {
    failure = err.name === "AbortError" ? "stopped" : err.message;
  } finally {
    state.abort = null;
    setBusy(false);
  }
  if (failure === null) {
    if (!text.textContent.trim()) text.textContent = answer || "(empty answer)";
    turn.dataset.state = "done";
    state.history.push({ role: "user", content: question }, { role: "assistant", content: answer });
    setStatus("");
  } else {
    turn.dataset.state = "error";
    text.textContent += (text.textContent ? "\n" : "") + `[${failure}]`;
    if (failure !== "stopped") showError(`No answer: ${failure}`);
    setStatus("");
  }
}

function clearAll() {
  stopAnswer();
  clearConversation();
  state.inputs = {};
  for (const caption of document.querySelectorAll("#other-inputs .input-row span")) {
    caption.textContent = "";
    delete caption.dataset.inputId;
  }
  const preview = $("preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");
  preview.hidden = true;
  delete preview.dataset.imageId;
  $("image-caption").textContent = "";
  $("question").value = "";
  showError("");
  setStatus("Cleared. Upload or pick an input to start again.");
}

// ---- start ------------------------------------------------------------------------------
async function main() {
  $("ask-form").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask-form").requestSubmit(); }
  });
  $("clear").addEventListener("click", clearAll);
  $("greedy").addEventListener("change", syncSampling);
  setupDrop();
  try {
    await loadInfo();
    await loadExamples();
    document.body.dataset.ready = "true";
  } catch (err) {
    showError(`Could not reach the demo server: ${err.message}`);
  }
}
main();
