// caster live captions: microphone -> AudioWorklet -> /v1/listen WebSocket -> captions.
//
// The page speaks caster.v1 (see caster/server/protocol.py): a start message,
// binary float32 audio (f32le) at the microphone's own sample rate, then
// {"type": "finalize"}; it shows each segment's interim results greyed and its
// final result fixed, with the segment's language.
//
// URL parameters (all optional):
//   language=en-US, chunk_ms=320   preselect the selectors
//   seconds=N                      stop by itself after N seconds of audio
//   token=KEY                      API key for servers that require one

"use strict";

const params = new URLSearchParams(window.location.search);
const languageSelect = document.getElementById("language");
const chunkSelect = document.getElementById("chunk");
const startButton = document.getElementById("start");
const statusLine = document.getElementById("status");
const captions = document.getElementById("captions");

const BATCH_SECONDS = 0.02; // audio per WebSocket message

let session = null; // the running capture, or null

function setState(state, text, isError = false) {
  document.body.dataset.state = state; // idle | starting | live | finishing | done | error
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function preselect(select, value) {
  if (value === null) return;
  if (![...select.options].some((o) => o.value === value)) {
    select.add(new Option(value, value));
  }
  select.value = value;
}

function listenUrl() {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  const url = new URL(`${scheme}//${window.location.host}/v1/listen`);
  if (params.get("token")) url.searchParams.set("token", params.get("token"));
  return url.toString();
}

// ------------------------------------------------------------------ captions

function segmentRow(index) {
  let row = captions.querySelector(`[data-segment="${index}"]`);
  if (!row) {
    row = document.createElement("div");
    row.dataset.segment = String(index);
    row.innerHTML = '<span class="lang"></span><span class="text"></span><span class="times"></span>';
    captions.appendChild(row);
  }
  return row;
}

function showResult(result) {
  const row = segmentRow(result.segment);
  row.className = `segment ${result.is_final ? "final" : "interim"}`;
  row.querySelector(".lang").textContent = result.language || "—";
  row.querySelector(".text").textContent = result.text;
  row.querySelector(".times").textContent =
    `${result.start.toFixed(2)}–${result.end.toFixed(2)} s`;
  row.scrollIntoView({ block: "nearest" });
}

// ------------------------------------------------------------------- capture

async function start() {
  captions.replaceChildren();
  setState("starting", "opening the microphone…");
  const stream = await navigator.mediaDevices.getUserMedia({
    // Any processing would change the samples the model hears.
    audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
  const track = stream.getAudioTracks()[0];
  // An AudioContext at the track's own rate: no resampling in the browser.
  const rate = track.getSettings().sampleRate;
  const context = rate ? new AudioContext({ sampleRate: rate }) : new AudioContext();
  await context.audioWorklet.addModule("capture-processor.js");
  const seconds = Number(params.get("seconds"));
  const node = new AudioWorkletNode(context, "caster-capture", {
    numberOfOutputs: 0,
    processorOptions: {
      batchSamples: Math.round(context.sampleRate * BATCH_SECONDS),
      maxSamples: seconds > 0 ? Math.round(seconds * context.sampleRate) : 0,
      skipSilence: true,
    },
  });
  const source = context.createMediaStreamSource(stream);
  const socket = new WebSocket(listenUrl());
  socket.binaryType = "arraybuffer";
  const current = { stream, context, node, source, socket, finishing: false, stopped: false };
  session = current;

  node.port.onmessage = (event) => {
    const message = event.data;
    if (message.type === "audio") {
      if (socket.readyState === WebSocket.OPEN) socket.send(message.samples.buffer);
    } else if (message.type === "end") {
      finish(current);
    }
  };
  socket.onopen = () => {
    socket.send(JSON.stringify({
      type: "start",
      language: languageSelect.value,
      chunk_ms: Number(chunkSelect.value),
      sample_rate: context.sampleRate,
      encoding: "f32le",
      channels: 1,
      interim_results: true,
    }));
  };
  socket.onmessage = (event) => onServerMessage(current, JSON.parse(event.data));
  socket.onclose = (event) => {
    if (session !== current) return;
    if (document.body.dataset.state !== "error" && document.body.dataset.state !== "done") {
      setState("error", `connection closed (${event.code} ${event.reason})`, true);
    }
    ended(current);
  };
  startButton.textContent = "Stop";
  startButton.classList.add("stop");
}

function onServerMessage(current, message) {
  if (session !== current) return; // a late message of an earlier stream
  if (message.type === "ready") {
    setState("live", `live · ${message.language || "auto"} · ${message.chunk_ms} ms chunks · ` +
      `${current.context.sampleRate} Hz`);
    current.source.connect(current.node); // capture only once the server has the stream
  } else if (message.type === "result") {
    showResult(message);
  } else if (message.type === "done") {
    setState("done", `done · ${message.duration.toFixed(2)} s of audio · ` +
      `${message.segments} segment(s)`);
    ended(current);
  } else if (message.type === "error") {
    setState("error", `${message.code}: ${message.message}`, true);
  }
}

// Stop the microphone and tell the server that no more audio comes.
function finish(current) {
  if (!current || current.finishing) return;
  current.finishing = true;
  stopCapture(current);
  if (current.socket.readyState === WebSocket.OPEN) {
    current.socket.send(JSON.stringify({ type: "finalize" }));
    setState("finishing", "finishing…");
  }
  startButton.disabled = true;
}

// The stream is over (done, refused or disconnected): ready for the next Start.
function ended(current) {
  stopCapture(current);
  session = null;
  startButton.textContent = "Start";
  startButton.classList.remove("stop");
  startButton.disabled = false;
}

function stopCapture(current) {
  if (!current || current.stopped) return;
  current.stopped = true;
  current.stream.getTracks().forEach((t) => t.stop());
  current.source.disconnect();
  if (current.context.state !== "closed") current.context.close();
}

startButton.addEventListener("click", () => {
  if (session) {
    // Flush what the worklet holds; its "end" message then finalizes.
    session.node.port.postMessage({ type: "stop" });
    return;
  }
  startButton.disabled = true;
  start()
    .catch((error) => {
      setState("error", `could not start: ${error.message}`, true);
      if (session) stopCapture(session);
      session = null;
    })
    .finally(() => { startButton.disabled = Boolean(session && session.finishing); });
});

preselect(languageSelect, params.get("language"));
preselect(chunkSelect, params.get("chunk_ms"));
setState("idle", "idle");
