// vitcli attention explorer: plain JavaScript, no dependencies, works from file://.
// The data element holds the image, colour tables and the attention rows (see explorer.py).
(function () {
  "use strict";

  // Errors are collected for the #selftest report as well as shown in the console.
  const errors = [];
  window.addEventListener("error", (event) => errors.push(String(event.message || event.error)));
  window.addEventListener("unhandledrejection", (event) => errors.push("unhandled rejection: " + event.reason));
  const consoleError = console.error.bind(console);
  console.error = function (...args) {
    errors.push(args.map(String).join(" "));
    consoleError(...args);
  };

  const data = JSON.parse(document.getElementById("explorer-data").textContent);
  const [gridH, gridW] = data.grid;
  const N = gridH * gridW;
  const P = data.prefix;
  const T = data.tokens;
  const NH = data.numHeads;
  const $ = (id) => document.getElementById(id);

  function bytes(b64) {
    const text = atob(b64);
    const out = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
    return out;
  }
  function floats(b64) {
    const raw = bytes(b64);
    return new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4);
  }
  async function levels(b64) {
    const raw = bytes(b64);
    if (data.compression !== "deflate") return raw;
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser cannot inflate the maps (no DecompressionStream); use a current Chromium, Firefox or Safari");
    }
    const stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }
  function loadImage(src) {
    return new Promise((resolve, reject) => {
      const image = new Image();
      image.onload = () => resolve(image);
      image.onerror = () => reject(new Error("the embedded image could not be decoded"));
      image.src = src;
    });
  }

  // -- state ----------------------------------------------------------------------------
  const state = {
    method: data.methods[0],
    layerIndex: 0, // index into the current method's layer list
    head: -1, // -1: mean over heads
    pinned: P > 0 ? 0 : P + Math.floor(gridH / 2) * gridW + Math.floor(gridW / 2),
    hover: null, // token index under the mouse, or null
    scale: "map",
    alpha: 0.6,
    smooth: true,
    gridlines: false,
    colormap: data.colormap,
  };
  const store = {}; // method -> {layers, levels, scales, prefix}
  let picture = null;
  const luts = {};
  for (const name of Object.keys(data.colormaps)) luts[name] = bytes(data.colormaps[name]);

  const query = () => (state.hover === null ? state.pinned : state.hover);
  const methodLayers = () => store[state.method].layers;
  const currentLayer = () => methodLayers()[Math.min(state.layerIndex, methodLayers().length - 1)];

  // One attention row: {patch: Float32Array(N), prefix: Float32Array(P)}.
  function row(method, layerIndex, head, token) {
    const part = store[method];
    const patch = new Float32Array(N);
    const prefix = new Float32Array(P);
    const heads = method === "rollout" ? [0] : head < 0 ? [...Array(NH).keys()] : [head];
    const perLayer = method === "rollout" ? 1 : NH;
    for (const h of heads) {
      const r = (layerIndex * perLayer + h) * T + token; // row number
      const scale = part.scales[r] / 255;
      const base = r * N;
      for (let k = 0; k < N; k++) patch[k] += part.levels[base + k] * scale;
      for (let j = 0; j < P; j++) prefix[j] += part.prefix[r * P + j];
    }
    if (heads.length > 1) {
      for (let k = 0; k < N; k++) patch[k] /= heads.length;
      for (let j = 0; j < P; j++) prefix[j] /= heads.length;
    }
    return { patch, prefix };
  }

  // The maps of the strip below the image: every head (and the mean) of the layer, or
  // rollout at every layer. They also define the "shared" colour range.
  function stripMaps() {
    const token = query();
    if (state.method === "rollout") {
      return methodLayers().map((layer, index) => ({
        key: index, caption: "rollout to layer " + layer, row: row("rollout", index, 0, token),
      }));
    }
    const maps = [{ key: -1, caption: "mean of " + NH + " heads", row: row("attention", state.layerIndex, -1, token) }];
    for (let h = 0; h < NH; h++) maps.push({ key: h, caption: "head " + h, row: row("attention", state.layerIndex, h, token) });
    return maps;
  }

  function currentRow() {
    return row(state.method, state.layerIndex, state.method === "rollout" ? 0 : state.head, query());
  }

  const maxOf = (values) => values.reduce((a, b) => (b > a ? b : a), 0);

  // -- drawing ----------------------------------------------------------------------------
  const cells = document.createElement("canvas");
  cells.width = gridW;
  cells.height = gridH;
  const cellsContext = cells.getContext("2d");

  function paintCells(values, high) {
    const lut = luts[state.colormap];
    const image = cellsContext.createImageData(gridW, gridH);
    for (let k = 0; k < N; k++) {
      const t = high > 0 ? Math.min(1, Math.max(0, values[k] / high)) : 0;
      const i = Math.round(t * 255) * 3;
      image.data[4 * k] = lut[i];
      image.data[4 * k + 1] = lut[i + 1];
      image.data[4 * k + 2] = lut[i + 2];
      image.data[4 * k + 3] = 255;
    }
    cellsContext.putImageData(image, 0, 0);
  }

  function drawMap(canvas, values, high, outlineToken) {
    const context = canvas.getContext("2d");
    const width = canvas.width, height = canvas.height;
    context.globalAlpha = 1;
    context.drawImage(picture, 0, 0, width, height);
    paintCells(values, high);
    context.globalAlpha = state.alpha;
    context.imageSmoothingEnabled = state.smooth;
    context.imageSmoothingQuality = "high";
    context.drawImage(cells, 0, 0, width, height);
    context.globalAlpha = 1;
    const cellW = width / gridW, cellH = height / gridH;
    if (state.gridlines) {
      context.strokeStyle = "rgba(255,255,255,0.35)";
      context.lineWidth = 1;
      context.beginPath();
      for (let c = 1; c < gridW; c++) { context.moveTo(c * cellW, 0); context.lineTo(c * cellW, height); }
      for (let r = 1; r < gridH; r++) { context.moveTo(0, r * cellH); context.lineTo(width, r * cellH); }
      context.stroke();
    }
    if (outlineToken !== null && outlineToken >= P) {
      const k = outlineToken - P;
      const x = (k % gridW) * cellW, y = Math.floor(k / gridW) * cellH;
      const line = Math.max(2, width / 300);
      context.lineWidth = line * 2;
      context.strokeStyle = "rgba(0,0,0,0.85)";
      context.strokeRect(x, y, cellW, cellH);
      context.lineWidth = line;
      context.strokeStyle = "#ffffff";
      context.strokeRect(x, y, cellW, cellH);
    }
  }

  function tokenName(token) {
    if (token < P) return data.prefixNames[token];
    const k = token - P;
    return "patch " + k + " (row " + Math.floor(k / gridW) + ", column " + (k % gridW) + ")";
  }

  // Names come from the page's data; the readout is HTML, so they are escaped into it.
  function escape(text) {
    const map = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
    return String(text).replace(/[&<>"']/g, (c) => map[c]);
  }

  function percent(value) { return (100 * value).toFixed(1) + "%"; }

  let maps = [];
  function render() {
    const token = query();
    maps = stripMaps();
    const selectedKey = state.method === "rollout" ? state.layerIndex : state.head;
    const selected = maps.find((m) => m.key === selectedKey) || maps[0];
    const shared = maxOf(maps.map((m) => maxOf(m.row.patch)));
    const highOf = (m) => (state.scale === "shared" ? shared : maxOf(m.row.patch));
    const high = highOf(selected);
    drawMap($("view"), selected.row.patch, high, token);

    // Readout: what the map says in numbers, so that a flat map never looks confident.
    const values = selected.row.patch;
    const patchMass = values.reduce((a, b) => a + b, 0);
    const top = values.indexOf(maxOf(values));
    const uniform = patchMass / N;
    const what = state.method === "rollout"
      ? "Rollout up to layer " + currentLayer()
      : "Layer " + currentLayer() + ", " + (state.head < 0 ? "mean of " + NH + " heads" : "head " + state.head);
    let text = "<b>" + escape(what) + "</b>, query <b>" + escape(tokenName(token)) + "</b>" +
      (state.hover !== null ? " (hover; click to pin)" : "") + ".<br>" +
      "Largest patch weight " + maxOf(values).toPrecision(3) + " = " + (uniform > 0 ? (maxOf(values) / uniform).toFixed(1) : "–") +
      "× the row's uniform share, at " + tokenName(top + P).replace(/^patch \d+ /, "") + ".";
    if (P > 0) {
      const prefixMass = selected.row.prefix.reduce((a, b) => a + b, 0);
      text += " " + escape(P === 1 ? data.prefixNames[0] : "Prefix tokens") + " take" + (P === 1 ? "s " : " ") +
        percent(prefixMass) + " of the row, the patches " + percent(patchMass) + ".";
    }
    $("readout").innerHTML = text;
    $("bar-high").textContent = high.toPrecision(3) + (state.scale === "shared" ? " (shared)" : "");
    $("query-value").textContent = tokenName(state.pinned) + " pinned";

    // The strip: every map of the same query.
    $("strip-title").textContent = state.method === "rollout"
      ? "Rollout up to each layer, query " + tokenName(token)
      : "Layer " + currentLayer() + ": every head, query " + tokenName(token);
    const strip = $("strip");
    if (strip.children.length !== maps.length || strip.dataset.method !== state.method) buildStrip();
    maps.forEach((m, i) => {
      const figure = strip.children[i];
      figure.classList.toggle("on", m.key === selectedKey);
      drawMap(figure.firstChild, m.row.patch, highOf(m), token);
      figure.lastChild.textContent = m.caption + " · max " + (maxOf(m.row.patch) / (m.row.patch.reduce((a, b) => a + b, 0) / N || 1)).toFixed(1) + "×";
    });
    syncControls();
    if (window.__explorerRendered) window.__explorerRendered();
  }

  function buildStrip() {
    const strip = $("strip");
    strip.textContent = "";
    strip.dataset.method = state.method;
    const long = 240;
    const scale = long / Math.max(picture.width, picture.height);
    for (const m of maps) {
      const figure = document.createElement("figure");
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(picture.width * scale));
      canvas.height = Math.max(1, Math.round(picture.height * scale));
      figure.appendChild(canvas);
      figure.appendChild(document.createElement("figcaption"));
      figure.addEventListener("click", () => {
        if (state.method === "rollout") state.layerIndex = m.key; else state.head = m.key;
        render();
      });
      strip.appendChild(figure);
    }
  }

  // -- controls ---------------------------------------------------------------------------
  function button(parent, label, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.addEventListener("click", onClick);
    parent.appendChild(b);
    return b;
  }

  const methodNames = { attention: "Attention", rollout: "Rollout" };
  const methodHelp = {
    attention: "The softmax weights of one layer: row q says how much query q reads from every patch.",
    rollout: "Attention rollout (Abnar & Zuidema 2020): R = Ã_l ⋯ Ã_0, Ã = mean over heads of A plus the identity, rows renormalised. Heads are already fused.",
  };

  function syncControls() {
    for (const b of $("methods").children) b.classList.toggle("on", b.dataset.value === state.method);
    for (const b of $("heads").children) {
      b.classList.toggle("on", Number(b.dataset.value) === state.head);
      b.disabled = state.method === "rollout";
    }
    for (const b of $("prefix").children) b.classList.toggle("on", Number(b.dataset.value) === state.pinned);
    const layers = methodLayers();
    const slider = $("layer");
    slider.max = String(layers.length - 1);
    slider.value = String(state.layerIndex);
    slider.disabled = layers.length < 2;
    const contiguous = layers.every((layer, i) => layer === layers[0] + i);
    const list = contiguous ? layers[0] + "–" + layers[layers.length - 1] : layers.join(", ");
    $("layer-value").textContent = String(currentLayer()) + (layers.length > 1 ? "  (of " + list + ")" : "");
    $("method-help").textContent = methodHelp[state.method];
  }

  function setMethod(method) {
    const layer = currentLayer();
    state.method = method;
    const layers = methodLayers();
    const same = layers.indexOf(layer);
    state.layerIndex = same >= 0 ? same : layers.length - 1;
    render();
  }

  function buildControls() {
    $("title").textContent = data.title || "Attention explorer";
    $("subtitle").textContent = data.subtitle || "";
    const predictions = $("predictions");
    data.predictions.forEach(([label, score], i) => {
      const span = document.createElement("span");
      const name = document.createElement(i === 0 ? "b" : "i");
      name.textContent = label;
      span.appendChild(name);
      span.appendChild(document.createTextNode(" " + (100 * score).toFixed(1) + "%"));
      predictions.appendChild(span);
    });
    for (const method of data.methods) {
      button($("methods"), methodNames[method], () => setMethod(method)).dataset.value = method;
    }
    button($("heads"), "mean", () => { state.head = -1; render(); }).dataset.value = "-1";
    for (let h = 0; h < NH; h++) button($("heads"), String(h), () => { state.head = h; render(); }).dataset.value = String(h);
    for (let j = 0; j < P; j++) {
      button($("prefix"), data.prefixNames[j], () => { state.pinned = j; state.hover = null; render(); }).dataset.value = String(j);
    }
    if (P === 0) $("prefix").textContent = "This model has no CLS token.";
    $("layer").addEventListener("input", (e) => { state.layerIndex = Number(e.target.value); render(); });
    $("scale").addEventListener("change", (e) => { state.scale = e.target.value; render(); });
    $("alpha").addEventListener("input", (e) => { state.alpha = Number(e.target.value); render(); });
    $("smooth").addEventListener("change", (e) => { state.smooth = e.target.checked; render(); });
    $("gridlines").addEventListener("change", (e) => { state.gridlines = e.target.checked; render(); });
    const select = $("colormap");
    for (const name of Object.keys(luts)) {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      option.selected = name === state.colormap;
      select.appendChild(option);
    }
    select.addEventListener("change", (e) => { state.colormap = e.target.value; drawBar(); render(); });
    $("alpha").value = String(state.alpha);

    const view = $("view");
    const tokenAt = (event) => {
      const rect = view.getBoundingClientRect();
      const x = (event.clientX - rect.left) / rect.width, y = (event.clientY - rect.top) / rect.height;
      if (x < 0 || x >= 1 || y < 0 || y >= 1) return null;
      return P + Math.floor(y * gridH) * gridW + Math.floor(x * gridW);
    };
    view.addEventListener("mousemove", (event) => {
      const token = tokenAt(event);
      if (token !== state.hover) { state.hover = token; render(); }
    });
    view.addEventListener("mouseleave", () => { state.hover = null; render(); });
    view.addEventListener("click", (event) => {
      const token = tokenAt(event);
      if (token !== null) { state.pinned = token; state.hover = null; render(); }
    });
    document.addEventListener("keydown", (event) => {
      if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
      const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
      if (!(event.key in moves)) return;
      event.preventDefault();
      const k = state.pinned < P ? Math.floor(gridH / 2) * gridW + Math.floor(gridW / 2) : state.pinned - P;
      const r = Math.min(gridH - 1, Math.max(0, Math.floor(k / gridW) + moves[event.key][0]));
      const c = Math.min(gridW - 1, Math.max(0, (k % gridW) + moves[event.key][1]));
      state.pinned = P + r * gridW + c;
      state.hover = null;
      render();
    });

    const notes = [
      "Showing " + (data.view.cropped ? "the region of the image the model saw (its center crop)" : "the image as the model saw it") +
        ", divided into its " + gridH + "×" + gridW + " patch grid" + (data.patchSize ? " (" + data.patchSize + "-pixel patches at the model's resolution)" : "") + ".",
      "Colours cover the patch weights only" + (P ? "; the weight on " + data.prefixNames.join(", ") + " is given in numbers above the colour bar" : "") +
        ". Maps are stored as 8-bit levels of each row's maximum (within 0.2% of it). Layers and heads count from 0.",
      "Made by vitcli. Works offline; nothing is loaded from the network.",
    ];
    for (const line of notes) {
      const p = document.createElement("p");
      p.textContent = line;
      $("notes").appendChild(p);
    }
  }

  function drawBar() {
    const bar = $("bar");
    const context = bar.getContext("2d");
    const image = context.createImageData(256, 1);
    const lut = luts[state.colormap];
    for (let i = 0; i < 256; i++) {
      image.data.set([lut[3 * i], lut[3 * i + 1], lut[3 * i + 2], 255], 4 * i);
    }
    context.putImageData(image, 0, 0);
  }

  // -- self-test (#selftest): hover two patches, hash the pixels, report in the DOM ---------
  function hashCanvas(canvas) {
    const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let hash = 0x811c9dc5;
    for (let i = 0; i < pixels.length; i++) {
      hash ^= pixels[i];
      hash = Math.imul(hash, 0x01000193) >>> 0;
    }
    return hash.toString(16).padStart(8, "0");
  }

  function selftest() {
    const view = $("view");
    const rect = view.getBoundingClientRect();
    const at = (row, col) => ({
      clientX: rect.left + ((col + 0.5) / gridW) * rect.width,
      clientY: rect.top + ((row + 0.5) / gridH) * rect.height,
      bubbles: true,
    });
    // hashes: the whole picture; mapHashes: the coloured patch grid alone (the map itself,
    // without the outline of the hovered patch, which would differ anyway).
    const report = { hashes: [], mapHashes: [], queries: [], steps: [] };
    const patches = [[0, 0], [gridH - 1, gridW - 1]];
    for (const [r, c] of patches) {
      view.dispatchEvent(new MouseEvent("mousemove", at(r, c)));
      report.queries.push(query());
      report.hashes.push(hashCanvas(view));
      paintCells(currentRow().patch, maxOf(currentRow().patch));
      report.mapHashes.push(hashCanvas(cells));
    }
    view.dispatchEvent(new MouseEvent("click", at(patches[1][0], patches[1][1])));
    report.steps.push("pinned " + state.pinned);
    for (const b of $("heads").children) b.click();
    report.steps.push("heads " + $("heads").children.length);
    for (const b of $("methods").children) b.click();
    report.steps.push("methods " + data.methods.join(","));
    $("scale").value = "shared";
    $("scale").dispatchEvent(new Event("change"));
    view.dispatchEvent(new MouseEvent("mouseleave", {}));
    report.errors = errors.slice();
    report.ok = report.errors.length === 0 && report.hashes[0] !== report.hashes[1] &&
      report.mapHashes[0] !== report.mapHashes[1];
    const out = document.createElement("pre");
    out.id = "selftest-result";
    out.textContent = JSON.stringify(report);
    document.body.appendChild(out);
    document.title = "selftest " + (report.ok ? "passed" : "failed");
  }

  // A link can open a given view: #method=rollout&layer=11&head=3&query=4,7 (or query=cls).
  function applyFragment(fragment) {
    const params = new URLSearchParams(fragment);
    if (data.methods.includes(params.get("method"))) setMethod(params.get("method"));
    const layer = methodLayers().indexOf(Number(params.get("layer")));
    if (params.has("layer") && layer >= 0) state.layerIndex = layer;
    const head = Number(params.get("head"));
    if (params.get("head") === "mean") state.head = -1;
    else if (params.has("head") && Number.isInteger(head) && head >= 0 && head < NH) state.head = head;
    const q = (params.get("query") || "").toLowerCase();
    const named = data.prefixNames.findIndex((name) => name.toLowerCase() === q);
    const cell = q.split(",").map(Number);
    if (named >= 0) state.pinned = named;
    else if (cell.length === 2 && cell.every(Number.isInteger) && cell[0] >= 0 && cell[0] < gridH && cell[1] >= 0 && cell[1] < gridW) {
      state.pinned = P + cell[0] * gridW + cell[1];
    }
    render();
  }

  async function main() {
    const [image, ...parts] = await Promise.all([
      loadImage(data.image),
      ...data.methods.map((method) => levels(data[method].levels)),
    ]);
    picture = image;
    data.methods.forEach((method, i) => {
      store[method] = {
        layers: data[method].layers,
        levels: parts[i],
        scales: floats(data[method].scales),
        prefix: floats(data[method].prefix),
      };
      const expected = data[method].layers.length * (method === "rollout" ? 1 : NH) * T * N;
      if (parts[i].length !== expected) throw new Error(method + ": " + parts[i].length + " levels, expected " + expected);
    });
    state.layerIndex = methodLayers().length - 1; // the last layer first, as `vit attention`
    const view = $("view");
    const ratio = Math.min(2, window.devicePixelRatio || 1);
    view.width = Math.round(data.view.width * ratio);
    view.height = Math.round(data.view.height * ratio);
    // Small views are enlarged up to 720 pixels on the long side, and every view fits the
    // window's height with room for the numbers below it; the grid mapping stays exact.
    const fit = () => {
      const aspect = data.view.width / data.view.height;
      const enlarged = data.view.width * Math.max(1, 720 / Math.max(data.view.width, data.view.height));
      const byHeight = Math.max(240, window.innerHeight - 330) * aspect;
      const room = document.querySelector("main").clientWidth;
      const beside = room - $("controls").offsetWidth - 28; // the controls sit to the right
      const width = Math.min(beside >= 360 ? beside : room, enlarged, byHeight);
      view.style.width = width + "px";
      $("stage").style.width = Math.max(width, 280) + "px";
    };
    fit();
    window.addEventListener("resize", fit);
    buildControls();
    drawBar();
    render();
    if (location.hash === "#selftest") selftest();
    else if (location.hash.length > 1) applyFragment(location.hash.slice(1));
  }

  main().catch((error) => {
    errors.push(String(error && error.message ? error.message : error));
    $("readout").textContent = "Could not show the maps: " + error;
    if (location.hash === "#selftest") {
      const out = document.createElement("pre");
      out.id = "selftest-result";
      out.textContent = JSON.stringify({ ok: false, errors: errors });
      document.body.appendChild(out);
    }
  });
})();
