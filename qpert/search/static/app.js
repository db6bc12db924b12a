// qpert photo search page: plain DOM, no build step. Data from the server is only ever put into
// the page through textContent and attributes, never as HTML.
"use strict";

const $ = (selector) => document.querySelector(selector);
const PALETTE = ["#ff5d5d", "#4fc3f7", "#ffd54f", "#81c784", "#ba68c8", "#ff8a65", "#4db6ac", "#f06292"];
const THUMB = { width: 220, height: 180 };
const QUERY_BOX_COLOR = "#ff00ff"; // not in PALETTE: the query's boxes stand apart from the detector's
let searchCount = 0;        // answers to older searches are dropped

async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `the server answered ${response.status}`);
  return data;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showStatus(message, isError = false) {
  const status = $("#status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

function labelColor(label) {
  let hash = 0;
  for (const ch of String(label)) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return PALETTE[hash % PALETTE.length];
}

// The photo scaled to fit maxWidth x maxHeight, its boxes placed in percent of its own pixels;
// results show a small upright thumbnail, the full view the photo itself.
function photoFrame(hit, maxWidth, maxHeight, full = false) {
  const scale = Math.min(maxWidth / hit.width, maxHeight / hit.height);
  const frame = el("div", "frame");
  frame.style.width = `${Math.round(hit.width * scale)}px`;
  frame.style.height = `${Math.round(hit.height * scale)}px`;
  const img = el("img");
  img.src = full ? `/photo/${hit.id}` : `/thumb/${hit.id}`;
  img.alt = hit.path;
  img.loading = "lazy";
  img.addEventListener("error", () => frame.classList.add("missing"));
  frame.append(img);
  for (const box of hit.boxes) frame.append(boxOverlay(box, hit.width, hit.height));
  for (const box of hit.query_boxes || []) frame.append(boxOverlay(box, hit.width, hit.height, true));
  return frame;
}

// Boxes the query named (query-aware Q-Pert) are drawn dashed in one colour of their own.
function boxOverlay({ box, score, label }, width, height, fromQuery = false) {
  const [x0, y0, x1, y1] = box;
  const node = el("div", fromQuery ? "box query-box" : "box");
  node.style.left = `${(100 * x0) / width}%`;
  node.style.top = `${(100 * y0) / height}%`;
  node.style.width = `${(100 * (x1 - x0)) / width}%`;
  node.style.height = `${(100 * (y1 - y0)) / height}%`;
  const color = fromQuery ? QUERY_BOX_COLOR : labelColor(label);
  node.style.borderColor = color;
  const tag = el("span", "box-label", `${fromQuery ? "query: " : ""}${label} ${score.toFixed(2)}`);
  tag.style.backgroundColor = color;
  node.append(tag);
  node.title = `${label} (${score.toFixed(3)}) at ${box.map(Math.round).join(", ")}`;
  return node;
}

function scoreTitle(hit) {
  return hit.itm === null ? `ITC ${hit.itc.toFixed(4)}`
                          : `ITM ${hit.itm.toFixed(4)} + ITC ${hit.itc.toFixed(4)}`;
}

// otherRanks: id -> rank in the other column (compare mode), or null.
function resultCard(hit, otherRanks, isQpert) {
  const card = el("figure", "result");
  card.dataset.id = hit.id;
  card.dataset.rank = hit.rank;
  card.tabIndex = 0;
  card.append(photoFrame(hit, THUMB.width, THUMB.height));
  const caption = el("figcaption");
  caption.append(el("span", "rank", `#${hit.rank}`));
  if (otherRanks) {
    const other = otherRanks.get(hit.id);
    if (other !== hit.rank) card.classList.add("changed");
    caption.append(el("span", "move", moveText(hit.rank, other, isQpert)));
  }
  const score = el("span", "score", hit.score.toFixed(3));
  score.title = scoreTitle(hit);
  caption.append(score, el("span", "path", hit.path));
  card.append(caption);
  card.addEventListener("click", () => openLightbox(hit));
  card.addEventListener("keydown", (e) => { if (e.key === "Enter") openLightbox(hit); });
  return card;
}

function moveText(rank, other, isQpert) {
  if (!isQpert) return other === undefined ? "not in Q-Pert's top" : `Q-Pert #${other}`;
  if (other === undefined) return "new";
  if (other === rank) return "=";
  return other > rank ? `▲${other - rank}` : `▼${rank - other}`;
}

function fillColumn(grid, hits, otherRanks, isQpert) {
  grid.replaceChildren(...hits.map((hit) => resultCard(hit, otherRanks, isQpert)));
  if (!hits.length) grid.append(el("p", "empty", "No photos in this index."));
}

function render(data) {
  const compare = Array.isArray(data.baseline);
  const ranks = (hits) => new Map(hits.map((h) => [h.id, h.rank]));
  fillColumn($("#results-qpert"), data.qpert, compare ? ranks(data.baseline) : null, true);
  $("#column-baseline").hidden = !compare;
  $("#results").classList.toggle("compare", compare);
  if (compare) fillColumn($("#results-baseline"), data.baseline, ranks(data.qpert), false);
  else $("#results-baseline").replaceChildren();
  const moved = document.querySelectorAll("#results-qpert .result.changed").length;
  showStatus(`${data.qpert.length} photos in ${data.seconds.toFixed(2)} s` +
             (data.itm ? ", re-ranked by ITM" : "") + (compare ? `; ${moved} moved by Q-Pert` : ""));
}

function searchParams() {
  return new URLSearchParams({
    q: $("#query").value.trim(),
    k: $("#k").value,
    itm: $("#itm").checked && !$("#itm-option").hidden ? "1" : "0",
    query_boxes: $("#query-boxes").checked && !$("#query-boxes-option").hidden ? "1" : "0",
    compare: $("#compare").checked ? "1" : "0",
  });
}

async function runSearch() {
  const params = searchParams();
  if (!params.get("q")) {
    showStatus("Type what to look for.", true);
    return;
  }
  const mine = ++searchCount;
  history.replaceState(null, "", `?${params}`);
  showStatus("searching…");
  $("#results").setAttribute("aria-busy", "true");
  try {
    const data = await getJSON(`/api/search?${params}`);
    if (mine === searchCount) render(data);
  } catch (error) {
    if (mine === searchCount) showStatus(error.message, true);
  } finally {
    if (mine === searchCount) $("#results").removeAttribute("aria-busy");
  }
}

function openLightbox(hit) {
  const box = $("#lightbox");
  const maxWidth = Math.max(200, window.innerWidth * 0.9);
  const maxHeight = Math.max(150, window.innerHeight * 0.8);
  $("#lightbox-photo").replaceChildren(photoFrame(hit, maxWidth, maxHeight, true));
  const labels = [...new Set(hit.boxes.map((b) => b.label))].join(", ") || "no objects detected";
  $("#lightbox-caption").textContent =
    `#${hit.rank} · ${hit.path} · ${hit.width}×${hit.height} · ${scoreTitle(hit)} · ${labels}`;
  box.hidden = false;
  $("#lightbox-close").focus();
}

function closeLightbox() {
  $("#lightbox").hidden = true;
}

async function loadInfo() {
  try {
    const info = await getJSON("/api/info");
    $("#info").textContent = `${info.photos} photos · model ${info.model} · detector ${info.detector} · ` +
                             `Q-Pert α=${info.qpert.alpha} (${info.qpert.weight})`;
    $("#itm-option").hidden = !info.itm;
    $("#query-boxes-option").hidden = !info.query_boxes;
    $("#k").max = info.max_k;
  } catch (error) {
    showStatus(`cannot read the index: ${error.message}`, true);
  }
}

function restoreFromUrl() {
  const params = new URLSearchParams(location.search);
  if (params.has("q")) $("#query").value = params.get("q");
  if (params.has("k")) $("#k").value = params.get("k");
  $("#itm").checked = params.get("itm") === "1";
  $("#query-boxes").checked = params.get("query_boxes") === "1";
  $("#compare").checked = params.get("compare") === "1";
  return params.has("q");
}

async function start() {
  $("#search-form").addEventListener("submit", (e) => { e.preventDefault(); runSearch(); });
  for (const id of ["#compare", "#itm", "#query-boxes"]) {
    $(id).addEventListener("change", () => { if ($("#query").value.trim()) runSearch(); });
  }
  $("#lightbox").addEventListener("click", (e) => { if (e.target === $("#lightbox")) closeLightbox(); });
  $("#lightbox-close").addEventListener("click", closeLightbox);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeLightbox(); });
  const hasQuery = restoreFromUrl();
  await loadInfo();
  if (hasQuery) runSearch();
}

start();
