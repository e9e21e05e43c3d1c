// The page of `convnext-audio serve`: it calls the server's own JSON API (/v1/models, /v1/tag, /v1/embed,
// /v1/search) and
// loads nothing from elsewhere. Microphone audio is captured as PCM with the Web Audio API and sent as a WAV
// file, which every decoder of the server reads (a MediaRecorder's WebM/Opus would need ffmpeg there).
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
let models = [];
let indexes = []; // the search indexes the server was started with (`serve --index`)
let lastUpload = null; // {blob, name}: what the downloads of CSV and embeddings send again

function model() { return models.find((m) => m.name === $("model").value) || models[0]; }

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function query(extra) {
  const params = new URLSearchParams({model: model().name, top_k: $("top-k").value,
                                      threshold: $("threshold").value, ...extra});
  return params.toString();
}

async function post(path, blob, name) {
  const form = new FormData();
  if (blob) form.append("file", blob, name);
  const response = await fetch(path, {method: "POST", body: blob ? form : undefined});
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = `${response.status}: ${(await response.json()).error}`; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// ------------------------------------------------------------------------------------------------ results

function tagRows(tbody, tags) {
  tbody.replaceChildren(...tags.map((tag) => {
    const row = document.createElement("tr");
    row.dataset.label = tag.label;
    row.dataset.score = String(tag.score);
    row.innerHTML = "<td></td><td></td><td class='bar'><div></div></td>";
    row.children[0].textContent = tag.label;
    row.children[1].textContent = tag.score.toFixed(4);
    row.children[2].firstChild.style.width = `${Math.round(tag.score * 100)}%`;
    return row;
  }));
  if (!tags.length) tbody.innerHTML = "<tr><td>no class at or above the threshold</td></tr>";
}

function drawTimeline(record) {
  const canvas = $("timeline");
  const context = canvas.getContext("2d");
  const [width, height, left, bottom] = [canvas.width, canvas.height, 40, 24];
  context.clearRect(0, 0, width, height);
  const duration = Math.max(record.duration_s, 1e-3);
  const x = (t) => left + (width - left - 10) * t / duration;
  const y = (s) => (height - bottom) * (1 - s) + 5 * s;
  const labels = record.tags.map((t) => t.label);
  const colour = (label) => COLOURS[labels.indexOf(label) % COLOURS.length];
  for (const event of record.events || []) { // events shaded in their class's colour
    if (!labels.includes(event.label)) continue;
    context.fillStyle = colour(event.label) + "30";
    context.fillRect(x(event.onset), y(1), x(event.offset) - x(event.onset), y(0) - y(1));
  }
  context.strokeStyle = "#999";
  context.fillStyle = "#555";
  context.font = "11px sans-serif";
  context.beginPath();
  context.moveTo(left, y(1)); context.lineTo(left, y(0)); context.lineTo(width - 10, y(0));
  context.stroke();
  for (const s of [0, 0.5, 1]) context.fillText(s.toFixed(1), 8, y(s) + 4);
  const step = Math.max(1, Math.ceil(duration / 10));
  for (let t = 0; t <= duration; t += step) context.fillText(`${t}s`, x(t) - 6, height - 6);
  const segments = (record.frames && record.frames.length ? record.frames : record.windows) || [];
  for (const label of labels) { // each class's score over time: a step at each frame (or window)
    context.strokeStyle = colour(label);
    context.lineWidth = 1.5;
    context.beginPath();
    segments.forEach((segment, i) => {
      const score = segment.scores[label];
      if (i === 0) context.moveTo(x(segment.start), y(score)); else context.lineTo(x(segment.start), y(score));
      context.lineTo(x(segment.end), y(score));
    });
    context.stroke();
  }
  $("legend").replaceChildren(...labels.map((label) => {
    const item = document.createElement("span");
    item.innerHTML = "<i></i>";
    item.firstChild.style.background = colour(label);
    item.append(label);
    return item;
  }));
}

function show(record, text) {
  $("result").hidden = false;
  $("result-title").textContent = record.file;
  const details = [`${record.duration_s.toFixed(2)} s`, `${record.sample_rate} Hz`, `${record.num_windows} window(s)`];
  if (record.downmixed) details.push(`${record.channels} channels downmixed`);
  $("result-info").textContent = details.join(", ");
  tagRows($("tags").tBodies[0], record.tags);
  drawTimeline(record);
  const events = record.events || [];
  $("events").tBodies[0].replaceChildren(...events.map((event) => {
    const row = document.createElement("tr");
    for (const value of [event.label, event.onset.toFixed(2), event.offset.toFixed(2), event.peak.toFixed(4)]) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.append(cell);
    }
    return row;
  }));
  const stem = record.file.replace(/\.[^.]*$/, "") || "result";
  const link = $("download-json");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([text], {type: "application/json"}));
  link.download = `${stem}.json`;
}

async function tagUpload(blob, name) {
  lastUpload = {blob, name};
  status(`Tagging ${name} with ${model().name}…`);
  const started = performance.now();
  try {
    const text = await (await post(`/v1/tag?${query({frames: "true"})}`, blob, name)).text();
    show(JSON.parse(text), text);
    status(`Tagged ${name} in ${((performance.now() - started) / 1000).toFixed(2)} s.`);
    document.body.dataset.state = "tagged";
  } catch (error) {
    status(`${name}: ${error.message}`, true);
    document.body.dataset.state = "error";
  }
}

async function download(path, extension) {
  if (!lastUpload) return;
  try {
    const blob = await (await post(path, lastUpload.blob, lastUpload.name)).blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `${lastUpload.name.replace(/\.[^.]*$/, "") || "result"}.${extension}`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } catch (error) {
    status(`download: ${error.message}`, true);
  }
}

// ----------------------------------------------------------------------------------------------- microphone

function wav(samples, rate) { // 16-bit PCM mono
  const buffer = new ArrayBuffer(44 + samples.length * 2);
  const view = new DataView(buffer);
  const text = (at, value) => { for (let i = 0; i < value.length; i++) view.setUint8(at + i, value.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    view.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, samples[i])) * 32767, true);
  }
  return new Blob([buffer], {type: "audio/wav"});
}

// The microphone as blocks of float samples at the audio context's rate, until stop().
async function capture(onBlock) {
  const stream = await navigator.mediaDevices.getUserMedia({audio: {echoCancellation: false,
    noiseSuppression: false, autoGainControl: false}});
  const context = new AudioContext();
  const source = context.createMediaStreamSource(stream);
  const processor = context.createScriptProcessor(4096, 1, 1);
  processor.onaudioprocess = (event) => onBlock(new Float32Array(event.inputBuffer.getChannelData(0)));
  source.connect(processor);
  processor.connect(context.destination);
  return {rate: context.sampleRate, stop() {
    processor.disconnect(); source.disconnect(); stream.getTracks().forEach((t) => t.stop()); context.close();
  }};
}

function join(blocks, total) {
  const samples = new Float32Array(total);
  let at = 0;
  for (const block of blocks) { samples.set(block, at); at += block.length; }
  return samples;
}

let recording = null;

async function toggleRecord() {
  if (recording) {
    const {mic, blocks, total} = recording;
    recording = null;
    mic.stop();
    $("record").classList.remove("on");
    $("record").textContent = "Record";
    await tagUpload(wav(join(blocks, total), mic.rate), "microphone.wav");
    return;
  }
  try {
    recording = {blocks: [], total: 0};
    recording.mic = await capture((block) => { recording.blocks.push(block); recording.total += block.length; });
    $("record").classList.add("on");
    $("record").textContent = "Stop and tag";
    status("Recording… press Stop to tag it.");
  } catch (error) {
    recording = null;
    status(`microphone: ${error.message}`, true);
  }
}

let live = null;

// Live mode: every hop, the latest window of the microphone (the model's window length) is tagged; one request
// at a time (a hop that comes while one is in progress is skipped), latency = the request's round trip.
async function toggleLive() {
  if (live) {
    clearInterval(live.timer);
    live.mic.stop();
    live = null;
    $("live").classList.remove("on");
    $("live").textContent = "Live";
    status("Live mode stopped.");
    return;
  }
  const windowSeconds = model().window_s;
  try {
    live = {blocks: [], total: 0, busy: false, hops: 0};
    live.mic = await capture((block) => {
      live.blocks.push(block);
      live.total += block.length;
      while (live.total - live.blocks[0].length >= windowSeconds * live.mic.rate) {
        live.total -= live.blocks.shift().length;
      }
    });
  } catch (error) {
    live = null;
    status(`microphone: ${error.message}`, true);
    return;
  }
  const state = live;
  $("live").classList.add("on");
  $("live").textContent = "Stop live";
  $("live-panel").hidden = false;
  $("live-window").textContent = windowSeconds;
  status("Live: tagging the latest window every hop.");
  state.timer = setInterval(async () => {
    if (state.busy || !state.total) return;
    state.busy = true;
    const samples = join(state.blocks, state.total);
    const keep = Math.min(samples.length, Math.round(windowSeconds * state.mic.rate));
    const started = performance.now();
    try {
      const record = await (await post(`/v1/tag?${query({})}`, wav(samples.subarray(samples.length - keep),
                                                                     state.mic.rate), "live.wav")).json();
      const latency = performance.now() - started;
      state.hops += 1;
      tagRows($("live-tags").tBodies[0], record.tags);
      $("live-latency").textContent = `hop ${state.hops}: ${(keep / state.mic.rate).toFixed(1)} s of audio, ` +
        `latency ${latency.toFixed(0)} ms`;
      $("live-latency").dataset.latencyMs = latency.toFixed(1);
      document.body.dataset.live = String(state.hops);
    } catch (error) {
      status(`live: ${error.message}`, true);
    } finally {
      state.busy = false;
    }
  }, Math.max(250, 1000 * Number($("hop").value)));
}

// ---------------------------------------------------------------------------------------------------- search

// The indexes the server was started with (`serve --index`): words in, files by their best window out.
function setUpSearch(indexes) {
  if (!indexes.length) return;
  $("search-index").replaceChildren(...indexes.map((name) => new Option(name, name)));
  $("search-index").hidden = indexes.length < 2;
  $("search-panel").hidden = false;
  $("search-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    document.body.dataset.search = "busy";
    const params = new URLSearchParams({q: $("search-query").value, index: $("search-index").value,
                                        top_k: $("top-k").value});
    try {
      const answer = await (await post(`/v1/search?${params}`)).json();
      $("search-results").tBodies[0].replaceChildren(...answer.results.map((result) => {
        const row = document.createElement("tr");
        row.dataset.file = result.file;
        row.dataset.score = String(result.score);
        const span = result.windows > 1 ? `${result.start_s.toFixed(1)}–${result.end_s.toFixed(1)}` : "";
        for (const text of [String(result.rank), result.score.toFixed(3), result.file, span]) {
          row.insertCell().textContent = text;
        }
        return row;
      }));
      document.body.dataset.search = "done";
    } catch (error) {
      status(`search: ${error.message}`, true);
      document.body.dataset.search = "error";
    }
  });
}

// --------------------------------------------------------------------------------------------------- set-up

async function start() {
  try {
    const response = await fetch("/v1/models");
    ({models, indexes} = await response.json());
  } catch (error) {
    status(`cannot list the models: ${error.message}`, true);
    return;
  }
  $("model").replaceChildren(...models.map((m) => new Option(m.name, m.name)));
  $("model-picker").hidden = models.length < 2;
  const describe = () => {
    const m = model();
    $("model-info").textContent = `${m.name}: ${m.num_classes} classes, ${m.window_s} s windows at ${m.sample_rate} Hz`;
  };
  describe();
  $("model").addEventListener("change", describe);
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) tagUpload(file, file.name);
  });
  $("record").addEventListener("click", toggleRecord);
  $("live").addEventListener("click", toggleLive);
  $("download-csv").addEventListener("click", (event) => {
    event.preventDefault();
    download(`/v1/tag?${query({frames: "true", format: "csv"})}`, "csv");
  });
  $("download-embeddings").addEventListener("click", (event) => {
    event.preventDefault();
    download(`/v1/embed?${new URLSearchParams({model: model().name, kind: "scene", format: "npz"})}`, "scene.npz");
  });
  setUpSearch(indexes || []);
  document.body.dataset.state = "ready";
}

start();
