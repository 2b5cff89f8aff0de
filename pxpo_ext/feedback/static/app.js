// The feedback page: paint marks on a canvas the size of the image, submit them as a PNG,
// poll /api/state while pxpo trains, then show the new image.
"use strict";

const COLOURS = { like: "rgb(0,255,0)", dislike: "rgb(255,0,0)" };
const UNDO_LIMIT = 50;
const POLL_MS = 500;

const image = document.getElementById("image");
const canvas = document.getElementById("marks");
const ctx = canvas.getContext("2d", { willReadFrequently: true });
const statusLine = document.getElementById("status");
const progress = document.getElementById("progress");
const brushSize = document.getElementById("brush-size");
const undoStack = [];
let imageVersion = 0;
let stroke = null;

function tool() { return document.querySelector("input[name=tool]:checked").value; }

function showStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

// Canvas coordinates of a pointer event: the canvas is shown larger than its pixel size.
function position(event) {
  const box = canvas.getBoundingClientRect();
  return [(event.clientX - box.left) * canvas.width / box.width,
          (event.clientY - box.top) * canvas.height / box.height];
}

function paintTo(x, y) {
  ctx.globalCompositeOperation = tool() === "erase" ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = tool() === "erase" ? "rgb(0,0,0)" : COLOURS[tool()];
  ctx.lineWidth = Number(brushSize.value);
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  if (stroke.last) {
    ctx.moveTo(...stroke.last);
    ctx.lineTo(x, y);
    ctx.stroke();
  } else {
    ctx.arc(x, y, ctx.lineWidth / 2, 0, 2 * Math.PI);
    ctx.fill();
  }
  stroke.last = [x, y];
}

canvas.addEventListener("pointerdown", (event) => {
  if (busy()) return;
  undoStack.push(ctx.getImageData(0, 0, canvas.width, canvas.height));
  if (undoStack.length > UNDO_LIMIT) undoStack.shift();
  stroke = { last: null };
  canvas.setPointerCapture(event.pointerId);
  paintTo(...position(event));
});
canvas.addEventListener("pointermove", (event) => { if (stroke) paintTo(...position(event)); });
for (const type of ["pointerup", "pointercancel"]) canvas.addEventListener(type, () => { stroke = null; });

brushSize.addEventListener("input", () => { document.getElementById("brush-size-value").textContent = brushSize.value; });
document.getElementById("undo").addEventListener("click", () => {
  const previous = undoStack.pop();
  if (previous) ctx.putImageData(previous, 0, 0);
});
document.getElementById("clear").addEventListener("click", () => {
  undoStack.push(ctx.getImageData(0, 0, canvas.width, canvas.height));
  ctx.clearRect(0, 0, canvas.width, canvas.height);
});

function busy() { return document.body.dataset.status === "training"; }

function render(state) {
  document.body.dataset.status = state.status;
  document.body.dataset.imageVersion = state.image_version;
  document.getElementById("prompt").textContent = state.prompt;
  document.getElementById("seed").textContent = state.seed;
  document.getElementById("round").textContent = state.round;
  const [height, width] = state.image_size;
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
    // Brush sizes are in image pixels: scale the range to the image (64 px scenes or 512 px photos).
    brushSize.max = Math.max(8, Math.round(Math.max(width, height) / 2));
    brushSize.value = Math.max(1, Math.round(Math.max(width, height) / 16));
    brushSize.dispatchEvent(new Event("input"));
  }
  const training = state.status === "training";
  progress.hidden = !training;
  if (training) {
    progress.max = state.progress.epochs;
    progress.value = state.progress.epoch;
    showStatus(`${state.message}: epoch ${state.progress.epoch} of ${state.progress.epochs} done, ` +
               `${state.progress.elapsed.toFixed(0)} s`);
  } else {
    showStatus(state.message, state.status === "error");
  }
  for (const id of ["submit", "save", "undo", "clear"]) document.getElementById(id).disabled = training;
  if (state.image_version !== imageVersion) {
    imageVersion = state.image_version;
    image.src = `/api/image?v=${imageVersion}`;
    ctx.clearRect(0, 0, canvas.width, canvas.height);  // the old marks were about the old image
    undoStack.length = 0;
  }
}

async function refresh() {
  const answer = await fetch("/api/state", { cache: "no-store" });
  const state = await answer.json();
  render(state);
  if (state.status === "training") setTimeout(refresh, POLL_MS);
}

async function post(url, body, headers = {}) {
  const answer = await fetch(url, { method: "POST", body, headers });
  const payload = await answer.json();
  if (!answer.ok) throw new Error(payload.error || `${url} answered ${answer.status}`);
  return payload;
}

document.getElementById("submit").addEventListener("click", async () => {
  const png = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  try {
    render(await post("/api/feedback", png, { "Content-Type": "image/png" }));
    setTimeout(refresh, POLL_MS);
  } catch (error) {
    showStatus(error.message, true);
  }
});

document.getElementById("save").addEventListener("click", async () => {
  try {
    const answer = await post("/api/save", "");
    showStatus(`saved the LoRA to ${answer.saved}`);
  } catch (error) {
    showStatus(error.message, true);
  }
});

refresh().catch((error) => showStatus(`cannot reach the pxpo server: ${error.message}`, true));
