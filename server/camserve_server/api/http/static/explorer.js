// The camserve explorer: this server's own JSON API (docs/http.md) from the browser, nothing
// loaded from anywhere else. Pick or drop an image: its classes (POST /v1/predict); choose a
// class: its map over the image (POST /v1/explain, the heatmap PNG under an opacity slider);
// tick classes, methods and layers: a grid of maps, with faithfulness scores; the explain
// options (the score explained, smoothing, counterfactual maps, the sign, Score-CAM's
// channels; for an embedding model a second image as the similarity concept); the sanity
// checks (POST /v1/check-sanity); live: the camera through the WebSocket StreamExplain
// (/v1/stream-explain, policy LATEST), the overlay at the rate the server keeps up with.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, file: null, concept: null, classes: [], selected: null,
                ticked: new Set(), live: null, asked: 0 };

function token() { return $("token").value.trim(); }

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (token()) h.Authorization = "Bearer " + token();
  return h;
}

function say(text, error) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(error));
}

async function api(path, options) {
  const answer = await fetch(path, Object.assign({}, options, {
    headers: headers((options || {}).headers) }));
  const text = await answer.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
  if (!answer.ok) {
    const message = body && body.message ? body.message : answer.status + " " + text;
    const error = new Error(message);
    error.status = answer.status;
    throw error;
  }
  return body;
}

function form(options) {
  const data = new FormData();
  data.append("images", state.file);
  if (options.similarToImage) data.append("images", state.concept);  // image 2: the concept
  data.append("options", JSON.stringify(options));
  return { method: "POST", body: data };
}

const methodName = (m) => m.replace("CAM_METHOD_", "").toLowerCase().replace(/_/g, "-");
const kindName = (k) => (k || "").replace("TARGET_KIND_", "").toLowerCase().replace(/_/g, " ");
const percent = (p) => ((p || 0) * 100).toFixed(1) + "%";
const png = (b64) => "data:image/png;base64," + b64;

// The heatmap PNG (grey, 0 to 1) through the jet colour map that the server's overlays use
// (camserve.maps.colorize: blue low, red high), so that the opacity slider blends it over the
// image as an overlay of that opacity would.
function colourize(img, b64) {
  img.dataset.heatmap = png(b64);
  const grey = new Image();
  grey.onload = () => {
    const canvas = document.createElement("canvas");
    canvas.width = grey.naturalWidth;
    canvas.height = grey.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(grey, 0, 0);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
    const data = pixels.data;
    for (let i = 0; i < data.length; i += 4) {
      const x = data[i] / 255;
      for (let c = 0; c < 3; c += 1) {
        data[i + c] = Math.round(255 * Math.min(1, Math.max(0, 1.5 - Math.abs(4 * x - (3 - c)))));
      }
      data[i + 3] = 255;
    }
    context.putImageData(pixels, 0, 0);
    img.src = canvas.toDataURL("image/png");
  };
  grey.src = png(b64);
}

// --- the explain options ----------------------------------------------------------------------

// The TargetKind values each kind of model accepts (GetModelInfo's outputActivation), its
// default first; SIMILARITY joins them while a concept image is chosen.
const KINDS = { softmax: ["LOGIT", "SOFTMAX", "REST", "RAW_SCORES", "FINER"],
                sigmoid: ["LOGIT", "SIGMOID", "RAW_SCORES"],
                embedding: ["RAW_SCORES"] };
const KIND_TEXT = { LOGIT: "logit (default)", SOFTMAX: "softmax probability",
                    REST: "ReST: the class against the rest",
                    RAW_SCORES: "raw scores: every output",
                    FINER: "Finer: the margin over similar classes",
                    SIGMOID: "sigmoid probability", SIMILARITY: "similarity to the concept" };
const FLAGS = [["eigen-smooth", "eigenSmooth"], ["aug-smooth", "augSmooth"],
               ["counterfactual", "counterfactual"], ["keep-sign", "keepSign"]];
const CHANNEL_METHODS = ["CAM_METHOD_SCORECAM", "CAM_METHOD_ABLATIONCAM"];

function showKinds(prefer) {
  const select = $("target-kind");
  const was = select.value;
  const activation = (state.info && state.info.outputActivation) || "softmax";
  const kinds = (KINDS[activation] || KINDS.softmax).concat(state.concept ? ["SIMILARITY"] : [])
    .map((k) => "TARGET_KIND_" + k);
  select.textContent = "";
  kinds.forEach((k) => {
    const option = document.createElement("option");
    option.value = k;
    option.textContent = KIND_TEXT[k.replace("TARGET_KIND_", "")];
    select.appendChild(option);
  });
  select.value = kinds.includes(prefer) ? prefer : kinds.includes(was) ? was : kinds[0];
}

function showChannels() {
  $("channels-label").hidden = !ticked("method").some((m) => CHANNEL_METHODS.includes(m));
}

const similarity = () => $("target-kind").value === "TARGET_KIND_SIMILARITY";

// The Target and Map boxes as ExplainOptions' JSON fields, those at their default left out.
// The server checks the combination; its refusal's message goes to the status line.
function chosenOptions() {
  const options = {};
  const kind = $("target-kind").value;
  if (kind && kind !== "TARGET_KIND_LOGIT") options.targetKind = kind;
  if (kind === "TARGET_KIND_SIMILARITY") options.similarToImage = 2;
  FLAGS.forEach(([id, field]) => { if ($(id).checked) options[field] = true; });
  const channels = $("score-cam-channels").value;
  if (!$("channels-label").hidden && channels !== "") options.scoreCamChannels = Number(channels);
  return options;
}

// What a map explains, for its caption: the class, and the score unless it is the logit; or
// TARGET_KIND_SIMILARITY's cosine similarity of the image's output to the concept.
function explained(m) {
  if (m.targetKind === "TARGET_KIND_SIMILARITY") {
    return "similarity " + (m.similarity || 0).toFixed(3);
  }
  const kind = m.targetKind && m.targetKind !== "TARGET_KIND_LOGIT" ? kindName(m.targetKind) : "";
  return m.target.label + (kind ? " · " + kind : "");
}

function pickConcept(file) {
  state.concept = file || null;
  const photo = $("concept-photo");
  photo.hidden = !file;
  if (file) photo.src = URL.createObjectURL(file); else photo.removeAttribute("src");
  showKinds(file ? "TARGET_KIND_SIMILARITY" : undefined);
}

// --- the model --------------------------------------------------------------------------------

async function loadInfo() {
  try {
    state.info = await api("/v1/info");
  } catch (error) {
    $("model").textContent = error.status === 401 ? "enter the server's token" : error.message;
    return;
  }
  const info = state.info;
  const layers = info.layers || [];
  const outputs = (info.labels || []).length;
  $("model").textContent = info.name + " · " + (info.outputActivation === "embedding" ?
    "an embedding of " + outputs + " values" : outputs + " classes") + " · " +
    (info.state || "").replace("SERVER_STATE_", "").toLowerCase();
  const limits = info.limits || {};
  if (limits.maxFaithfulnessSteps) $("steps").max = limits.maxFaithfulnessSteps;
  if (limits.maxScoreCamChannels) {
    $("score-cam-channels").max = limits.maxScoreCamChannels;
    $("score-cam-channels").placeholder = "all, ≤ " + limits.maxScoreCamChannels;
  }
  showKinds();
  const methods = $("methods");
  methods.querySelectorAll("label").forEach((l) => l.remove());
  (info.methods || []).forEach((m, i) => {
    methods.appendChild(checkbox("method", m.method, methodName(m.method), i === 0));
  });
  const layerBox = $("layers");
  layerBox.querySelectorAll("label").forEach((l) => l.remove());
  layers.forEach((l) => {
    layerBox.appendChild(checkbox("layer", l.name, l.name + " (" + (l.height || 0) + "×" +
      (l.width || 0) + ")", l.name === info.defaultLayer));
  });
  showChannels();
}

function checkbox(name, value, text, checked) {
  const label = document.createElement("label");
  const input = document.createElement("input");
  input.type = "checkbox";
  input.name = name;
  input.value = value;
  input.checked = checked;
  label.appendChild(input);
  label.appendChild(document.createTextNode(" " + text));
  return label;
}

const ticked = (name) => Array.from(document.querySelectorAll(
  "input[name=" + name + "]:checked")).map((i) => i.value);

// --- an image ---------------------------------------------------------------------------------

async function pick(file) {
  if (!file) return;
  if (!state.info) await loadInfo();
  state.file = file;
  state.ticked.clear();
  stopLive();
  $("photo").src = URL.createObjectURL(file);
  $("heat").removeAttribute("src");
  delete $("heat").dataset.heatmap;
  $("result").hidden = false;
  $("options").hidden = false;
  $("grid-section").hidden = true;
  $("sanity-section").hidden = true;
  say("classifying " + file.name + "…");
  try {
    const answer = await api("/v1/predict", form({ topK: 5 }));
    state.classes = (answer.results[0].prediction.top || []).map((c) => ({
      index: c.index || 0, label: c.label, probability: c.probability || 0 }));
  } catch (error) {
    say(error.message, true);
    return;
  }
  showClasses();
  await choose(state.classes.length ? state.classes[0].index : null);
}

function showClasses() {
  const list = $("classes");
  list.textContent = "";
  $("classes-hint").textContent = state.classes.length ?
    "Choose a class to see its map; tick classes for the grid." :
    "No classes: an embedding model's output is a vector. Choose a concept image under " +
    "Target, and the map shows why this image is similar to it.";
  const best = state.classes.length ? state.classes[0].probability : 1;
  state.classes.forEach((c) => {
    const item = document.createElement("li");
    const tick = document.createElement("input");
    tick.type = "checkbox";
    tick.checked = state.ticked.has(c.index);
    tick.setAttribute("aria-label", "include " + c.label + " in the grid");
    tick.addEventListener("change", () => {
      if (tick.checked) state.ticked.add(c.index); else state.ticked.delete(c.index);
    });
    const button = document.createElement("button");
    button.type = "button";
    button.className = "class";
    button.dataset.index = c.index;
    button.setAttribute("aria-pressed", String(c.index === state.selected));
    const name = document.createElement("span");
    name.textContent = c.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.max(2, 60 * c.probability / best) + "px";
    const value = document.createElement("span");
    value.textContent = percent(c.probability);
    button.append(name, bar, value);
    button.addEventListener("click", () => choose(c.index));
    item.append(tick, button);
    list.appendChild(item);
  });
}

// The map of a class (null: no class, for an embedding model or the similarity) with the
// first ticked method and layer and the chosen options; only the latest choice is shown.
async function choose(index) {
  if (!state.file) return;
  state.selected = index;
  if (index !== null) state.ticked.add(index);
  showClasses();
  const method = ticked("method")[0] || "CAM_METHOD_GRADCAM";
  const layer = ticked("layer")[0];
  const options = Object.assign(chosenOptions(), { methods: [method],
                                                   outputs: ["EXPLAIN_OUTPUT_HEATMAP_PNG"] });
  if (index !== null && !similarity()) options.targets = [{ classIndex: index }];
  if (layer) options.layers = [layer];
  const asked = ++state.asked;
  say("explaining…");
  try {
    const answer = await api("/v1/explain", form(options));
    if (asked !== state.asked) return;
    const map = answer.results[0].maps[0];  // the first image's: a concept comes second
    colourize($("heat"), map.heatmapPng);
    $("heat").alt = "the " + methodName(map.method) + " map of " + map.target.label;
    $("view-caption").textContent = explained(map) + " · " + methodName(map.method) + " · " +
      map.layer;
    say((map.notes || []).map((n) => n.message).join(" "));
  } catch (error) {
    if (asked === state.asked) say(error.message, true);
  }
}

// --- the grid ---------------------------------------------------------------------------------

async function grid() {
  const methods = ticked("method");
  const layers = ticked("layer");
  const classless = similarity() || !state.classes.length;
  const targets = classless ? [] : Array.from(state.ticked).map((i) => ({ classIndex: i }));
  if (!methods.length || !(classless || targets.length)) {
    say("tick at least one method and one class", true);
    return;
  }
  const options = Object.assign(chosenOptions(), { methods: methods,
                                                   outputs: ["EXPLAIN_OUTPUT_HEATMAP_PNG"] });
  if (targets.length) options.targets = targets;
  if (layers.length) options.layers = layers;
  if ($("faithfulness").checked) options.faithfulnessSteps = Number($("steps").value || 16);
  if ($("road").checked) options.roadPercentiles = [10, 20, 30, 40, 50, 60, 70, 80, 90];
  say("explaining " + (classless ? "" : targets.length + " classes × ") + methods.length +
      " methods…");
  let answer;
  try {
    answer = await api("/v1/explain", form(options));
  } catch (error) {
    say(error.message, true);
    return;
  }
  const maps = answer.results[0].maps;
  const columns = [];
  const rows = [];
  maps.forEach((m) => {
    const column = methodName(m.method) + (layers.length > 1 ? " · " + m.layer : "");
    if (!columns.includes(column)) columns.push(column);
    const label = m.target.label;
    if (!rows.includes(label)) rows.push(label);
  });
  const box = $("grid");
  box.textContent = "";
  box.style.gridTemplateColumns = "8rem repeat(" + columns.length + ", minmax(9rem, 32rem))";
  box.appendChild(cell("div", "head corner", ""));
  columns.forEach((c) => box.appendChild(cell("div", "head", c)));
  const photo = $("photo").src;
  rows.forEach((row) => {
    box.appendChild(cell("div", "head", row));
    columns.forEach((column) => {
      const m = maps.find((x) => x.target.label === row && (methodName(x.method) +
        (layers.length > 1 ? " · " + x.layer : "")) === column);
      const figure = document.createElement("figure");
      figure.className = "stack cell";
      figure.setAttribute("role", "cell");
      const base = document.createElement("img");
      base.src = photo;
      base.alt = "";
      const heat = document.createElement("img");
      heat.className = "heat";
      colourize(heat, m.heatmapPng);
      heat.alt = column + " map of " + row;
      heat.style.opacity = $("opacity").value;
      const caption = document.createElement("figcaption");
      caption.textContent = column + (m.targetKind === "TARGET_KIND_SIMILARITY" ? " · " +
        explained(m) : "") + (m.faithfulness && m.faithfulness.steps ? " · del " +
        (m.faithfulness.deletion || 0).toFixed(2) + " ins " +
        (m.faithfulness.insertion || 0).toFixed(2) : "") +
        (m.faithfulness && m.faithfulness.roadPercentiles ? " · ROAD " +
        (m.faithfulness.roadCombined || 0).toFixed(3) : "");
      figure.append(base, heat, caption);
      box.appendChild(figure);
    });
  });
  $("grid-section").hidden = false;
  plotFaithfulness(maps.filter((m) => m.faithfulness && m.faithfulness.steps));
  say(maps.length + (maps.length === 1 ? " map" : " maps"));
}

function cell(tag, className, text) {
  const element = document.createElement(tag);
  element.className = className;
  element.textContent = text;
  return element;
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes, text) {
  const element = document.createElementNS(SVG, tag);
  Object.entries(attributes).forEach(([k, v]) => element.setAttribute(k, v));
  if (text !== undefined) element.textContent = text;
  return element;
}

function plotFaithfulness(maps) {
  const box = $("faith-plot");
  box.hidden = !maps.length;
  const plot = $("faith-svg");
  plot.textContent = "";
  if (!maps.length) return;
  const rowHeight = 22, left = 190, width = 420;
  plot.setAttribute("viewBox", "0 0 " + (left + width + 90) + " " +
    (maps.length * rowHeight + 30));
  maps.forEach((m, i) => {
    const y = 20 + i * rowHeight;
    plot.appendChild(svg("text", { x: 0, y: y + 12, "font-size": 11 },
      m.target.label.slice(0, 18) + " · " + methodName(m.method)));
    const del = m.faithfulness.deletion || 0, ins = m.faithfulness.insertion || 0;
    plot.appendChild(svg("rect", { x: left, y: y, width: width * del, height: 8,
                                   fill: "#5b6470" }));
    plot.appendChild(svg("rect", { x: left, y: y + 9, width: width * ins, height: 8,
                                   fill: "#b4372b" }));
    plot.appendChild(svg("text", { x: left + width + 4, y: y + 12, "font-size": 10 },
      del.toFixed(2) + " / " + ins.toFixed(2)));
  });
  plot.appendChild(svg("text", { x: left, y: 12, "font-size": 11 },
    "deletion (grey) · insertion (red), 0 to 1"));
}

// --- sanity checks ----------------------------------------------------------------------------

async function sanity() {
  const methods = ticked("method");
  const layer = ticked("layer")[0];
  say("running the sanity checks (several explanations per method)…");
  let answer;
  try {
    answer = await api("/v1/check-sanity", { method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ images: [{ encoded: await base64(state.file) }],
                             methods: methods, layer: layer || "" }) });
  } catch (error) {
    say(error.message, true);
    return;
  }
  const body = $("sanity").querySelector("tbody");
  body.textContent = "";
  (answer.methods || []).forEach((m) => {
    const row = document.createElement("tr");
    row.appendChild(cell("th", "", methodName(m.method)));
    const curve = document.createElement("td");
    curve.appendChild(sparkline(m.randomisation || []));
    row.appendChild(curve);
    row.appendChild(cell("td", "", m.randomisationPassed ? "yes" : "no"));
    row.appendChild(cell("td", "", (m.discrimination || 0).toFixed(2)));
    row.appendChild(cell("td", "", m.discriminationPassed ? "yes" : "no"));
    body.appendChild(row);
  });
  $("sanity-section").hidden = false;
  say("");
}

function sparkline(values) {
  const plot = svg("svg", { viewBox: "0 0 120 32", role: "img",
                            "aria-label": values.map((v) => v.toFixed(2)).join(", ") });
  if (values.length) {
    const step = values.length > 1 ? 116 / (values.length - 1) : 0;
    const points = values.map((v, i) => (2 + i * step) + "," + (30 - 28 * Math.max(0, v)));
    plot.appendChild(svg("polyline", { points: points.join(" "), fill: "none",
                                       stroke: "#b4372b", "stroke-width": 2 }));
  }
  return plot;
}

function base64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// --- live -------------------------------------------------------------------------------------

async function startLive() {
  if (!state.info) await loadInfo();
  stopLive();
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640 } });
  } catch (error) {
    say("no camera: " + error.message, true);
    return;
  }
  const video = $("camera");
  video.srcObject = stream;
  await video.play();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = token() ? "?access_token=" + encodeURIComponent(token()) : "";
  const socket = new WebSocket(scheme + "//" + location.host + "/v1/stream-explain" + query);
  const live = { stream: stream, socket: socket, frames: 0, answers: [], busy: false,
                 next: 1 };
  state.live = live;
  $("live").hidden = false;
  socket.onopen = () => {
    const method = ticked("method")[0] || "CAM_METHOD_GRADCAM";
    const options = Object.assign(chosenOptions(), { methods: [method],
                                                     outputs: ["EXPLAIN_OUTPUT_OVERLAY_JPEG"] });
    if (options.similarToImage) {  // a stream's frames come one at a time: no concept image
      delete options.similarToImage;
      delete options.targetKind;
    }
    socket.send(JSON.stringify({ config: { policy: "STREAM_POLICY_LATEST", options: options } }));
    send(live);
  };
  socket.onmessage = (event) => {
    const answer = JSON.parse(event.data);
    if (answer.error && !answer.frameId) {
      say(answer.error.message, true);
      return;
    }
    live.busy = false;
    if (answer.result) {
      const map = answer.result.maps[0];
      $("live-overlay").src = "data:image/jpeg;base64," + map.overlay;
      $("live-label").textContent = map.target.label + " " + percent(map.target.probability);
      const now = performance.now();
      live.answers.push(now);
      while (live.answers.length && now - live.answers[0] > 2000) live.answers.shift();
      const fps = live.answers.length > 1 ? (live.answers.length - 1) * 1000 /
        (now - live.answers[0]) : 0;
      $("fps").textContent = fps.toFixed(1) + " fps";
    } else if (answer.error) {
      say(answer.error.message, true);
    }
    send(live);
  };
  socket.onclose = () => { if (state.live === live) stopLive(); };
  say("live: the camera's frames go to the server as fast as it answers them");
}

function send(live) {
  if (state.live !== live || live.busy || live.socket.readyState !== WebSocket.OPEN) return;
  const video = $("camera");
  const canvas = $("frame");
  const width = Math.min(320, video.videoWidth || 320);
  canvas.width = width;
  canvas.height = Math.round(width * (video.videoHeight || 240) / (video.videoWidth || 320));
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  live.busy = true;
  canvas.toBlob(async (blob) => {
    if (state.live !== live) return;
    const frame = { frameId: live.next++, image: { encoded: await base64(blob) } };
    live.socket.send(JSON.stringify({ frame: frame }));
    live.frames += 1;
  }, "image/jpeg", 0.8);
}

function stopLive() {
  const live = state.live;
  if (!live) return;
  state.live = null;
  live.stream.getTracks().forEach((t) => t.stop());
  if (live.socket.readyState <= WebSocket.OPEN) live.socket.close();
  $("live").hidden = true;
}

// --- wiring -----------------------------------------------------------------------------------

function setOpacity() {
  const value = $("opacity").value;
  document.querySelectorAll("img.heat").forEach((img) => { img.style.opacity = value; });
}

function wire() {
  $("file").addEventListener("change", (event) => pick(event.target.files[0]));
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((kind) => drop.addEventListener(kind, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((kind) => drop.addEventListener(kind, () => {
    drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    pick(event.dataTransfer.files[0]);
  });
  $("opacity").addEventListener("input", setOpacity);
  $("methods").addEventListener("change", showChannels);
  $("concept").addEventListener("change", (event) => pickConcept(event.target.files[0]));
  // A changed option (the concept's listener above goes first) re-explains the view.
  ["target", "map-options"].forEach((id) => $(id).addEventListener("change",
    () => choose(state.selected)));
  $("grid-button").addEventListener("click", grid);
  $("sanity-button").addEventListener("click", sanity);
  $("live-start").addEventListener("click", startLive);
  $("live-stop").addEventListener("click", stopLive);
  $("token").value = sessionStorage.getItem("camserve-token") || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("camserve-token", token());
    loadInfo();
  });
  setOpacity();
  loadInfo();
}

wire();
