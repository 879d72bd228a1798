// The kiosk page: upload a photo, show its nearest gallery photos, toggle parts, explain.
// A part is a concept (CMN) or a group of dimensions (DGML); window.KIOSK.noun says which.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: null, off: new Set(), version: 0, chosen: null, asked: 0 };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function send(photo) {
  if (!photo) return;
  $("query").src = URL.createObjectURL(photo);
  $("query").hidden = false;
  $("drop-text").textContent = "Drop or click for another photo";
  setStatus("Looking at your photo…");
  const form = new FormData();
  form.append("photo", photo);
  const reply = await fetch("/api/query", { method: "POST", body: form });
  const body = await reply.json();
  if (!reply.ok) {
    setStatus(body.error || "That photo could not be used.", true);
    return;
  }
  state.token = body.token;
  state.off = new Set();
  state.chosen = null;
  $("explain").hidden = true;
  showConcepts(body.concepts);
  await search();
}

function showConcepts(concepts) {
  const box = $("concepts");
  box.replaceChildren();
  for (const c of concepts) {
    const chip = document.createElement("button");
    chip.className = "chip";
    chip.type = "button";
    chip.dataset.concept = c.index;
    chip.setAttribute("aria-pressed", "true");
    chip.title = `${window.KIOSK.noun} #${c.index}: adds ${c.contribution.toFixed(3)} ` +
      "to the scores shown";
    chip.textContent = c.label;
    chip.addEventListener("click", () => toggle(chip));
    box.append(chip);
  }
}

function toggle(chip) {
  const index = Number(chip.dataset.concept);
  const on = state.off.has(index);
  if (on) state.off.delete(index); else state.off.add(index);
  chip.setAttribute("aria-pressed", String(on));
  search();
}

async function search() {
  if (!state.token) return;
  const params = new URLSearchParams({ q: state.token, k: window.KIOSK.k });
  if (state.off.size) params.set("off", [...state.off].join(","));
  setStatus("Searching…");
  const asked = ++state.asked;
  const reply = await fetch(`/api/search?${params}`);
  const body = await reply.json();
  if (asked !== state.asked) return;  // a newer search (another toggle) is on its way
  if (!reply.ok) {
    setStatus(body.error || "Search failed.", true);
    return;
  }
  showResults(body.results);
  if (state.chosen !== null) {  // keep the explanation in step with the scores shown
    const card = document.querySelector(`.hit[data-id="${state.chosen}"]`);
    if (card) explain({ id: state.chosen, name: card.dataset.name }, card);
    else { state.chosen = null; $("explain").hidden = true; }
  }
  const off = state.off.size ? ` without ${state.off.size} ${window.KIOSK.noun}(s)` : "";
  setStatus(`${body.results.length} most similar photos${off}.`);
}

function showResults(results) {
  const box = $("results");
  box.replaceChildren();
  for (const hit of results) {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.id = hit.id;
    card.dataset.name = hit.name;
    if (hit.id === state.chosen) card.classList.add("chosen");
    const img = document.createElement("img");
    img.src = hit.thumb;
    img.alt = hit.name;
    const caption = document.createElement("figcaption");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = hit.name;
    name.title = hit.name;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    caption.append(name, score);
    const why = document.createElement("button");
    why.className = "why";
    why.type = "button";
    why.textContent = "Why?";
    why.addEventListener("click", () => explain(hit, card));
    card.append(img, caption, why);
    box.append(card);
  }
  state.version += 1;
  box.dataset.version = state.version;  // lets a test (or you) see that results were redrawn
}

function explain(hit, card) {
  state.chosen = hit.id;
  document.querySelectorAll(".hit.chosen").forEach((c) => c.classList.remove("chosen"));
  card.classList.add("chosen");
  const off = [...state.off].join(",");
  const without = off ? ` without ${state.off.size} ${window.KIOSK.noun}(s)` : "";
  $("explain-title").textContent = `Why your photo matches ${hit.name}${without}`;
  $("heatmap").src = `/explain/${state.token}/${hit.id}.png` + (off ? `?off=${off}` : "");
  $("explain").hidden = false;
}

$("heatmap").addEventListener("error", () => setStatus("The explanation could not be drawn.", true));
$("photo").addEventListener("change", (e) => send(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  send(e.dataTransfer.files[0]);
});
