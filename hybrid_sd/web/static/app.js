// The page of hybrid-sd's HTTP face: one generation with live progress and previews
// (POST /v1/generate/stream, read as server-sent events), and a comparison of switch points
// (POST /v1/generate at several k). No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const STAGES = ["queue", "encode_prompt", "cloud_denoise", "handoff_encode", "handoff_transfer",
  "handoff_decode", "edge_denoise", "vae_decode"];

$("token").value = localStorage.getItem("hybrid-sd-token") || "";
$("token").addEventListener("change", () => localStorage.setItem("hybrid-sd-token", $("token").value));
$("steps").addEventListener("input", syncSlider);
$("switch_step").addEventListener("input", () => { $("switch_value").value = $("switch_step").value; });
syncSlider();

function syncSlider() {
  const slider = $("switch_step");
  slider.max = $("steps").value;
  if (+slider.value > +slider.max) slider.value = slider.max;
  $("switch_value").value = slider.value;
}

function request(switchStep) {
  const body = {
    prompt: $("prompt").value,
    num_inference_steps: +$("steps").value,
    switch_step: switchStep,
  };
  if ($("seed").value !== "") body.seed = $("seed").value;
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  if ($("scheduler").value) body.scheduler = $("scheduler").value;
  return body;
}

function headers() {
  const result = { "content-type": "application/json" };
  if ($("token").value) result.authorization = "Bearer " + $("token").value;
  return result;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function failure(answer, httpStatus) {
  const error = answer && answer.error;
  return new Error(error ? `${error.code} (${error.status}): ${error.message}` : `HTTP ${httpStatus}`);
}

// Server-sent events from a fetch: calls onEvent(name, data) for each.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      onEvent(name, JSON.parse(data));
    }
  }
}

// One cell per UNet evaluation, coloured by the side that ran it (sides: the stages seen so far).
function showProgress(progress, sides) {
  const handoff = progress.stage === "edge_denoise" && sides[progress.step - 2] === "cloud_denoise";
  sides[progress.step - 1] = progress.stage;
  const bar = $("progress");
  bar.replaceChildren();
  for (let index = 0; index < progress.total; index++) {
    const cell = document.createElement("span");
    cell.style.flex = "1";
    cell.className = sides[index] || "todo";
    bar.append(cell);
  }
  const side = progress.stage === "cloud_denoise" ? "cloud" : "edge";
  status(`${side} step ${progress.step} of ${progress.total}${handoff ? ", after the handoff" : ""}`);
  if (progress.preview_png) $("preview").src = "data:image/png;base64," + progress.preview_png;
}

function timingsBar(bar, timings) {
  bar.replaceChildren();
  const total = STAGES.reduce((sum, stage) => sum + (timings[stage] || 0), 0) || 1;
  for (const stage of STAGES) {
    const seconds = timings[stage] || 0;
    if (!seconds) continue;
    const part = document.createElement("span");
    part.className = stage;
    part.style.width = (100 * seconds / total) + "%";
    part.title = `${stage}: ${seconds.toFixed(3)} s`;
    bar.append(part);
  }
}

function showLegend() {
  $("legend").replaceChildren(...STAGES.map((stage) => {
    const item = document.createElement("li");
    item.innerHTML = `<i class="${stage}"></i>${stage}`;
    return item;
  }));
}

function describe(result) {
  const total = result.timings.total.toFixed(2);
  const fallback = result.edge_fallback ? ", edge fallback" : "";
  return `seed ${result.seed}, k = ${result.switch_step} of ${result.num_inference_steps}` +
    ` (${result.cloud_unet_evaluations} cloud + ${result.edge_unet_evaluations} edge evaluations),` +
    ` ${result.handoff_bytes} handoff bytes, ${total} s${fallback}`;
}

async function generate(event) {
  event.preventDefault();
  const switchStep = +$("switch_step").value;
  // About ten previews a run, each the predicted image through the side's small decoder.
  const body = { ...request(switchStep), preview_every: Math.max(1, Math.floor(+$("steps").value / 10)) };
  const sides = [];
  $("generate").disabled = true;
  $("image").removeAttribute("src");
  $("preview").removeAttribute("src");
  status("waiting for the first step...");
  try {
    const response = await fetch("/v1/generate/stream", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) throw failure(await response.json().catch(() => null), response.status);
    await readEvents(response, (name, data) => {
      if (name === "progress") showProgress(data, sides);
      else if (name === "error") throw failure(data, data.error.status);
      else if (name === "result") {
        $("image").src = "data:" + data.mime_type + ";base64," + data.image;
        $("caption").textContent = describe(data);
        timingsBar($("timings"), data.timings);
        showLegend();
        status("done");
      }
    });
  } catch (error) {
    status(error.message, true);
  } finally {
    $("generate").disabled = false;
  }
}

function switchPoints(steps) {
  const points = $("compare_at").value.split(",").map((text) => text.trim()).filter(Boolean).map((text) =>
    text.endsWith("%") ? Math.round(steps * parseFloat(text) / 100) : parseInt(text, 10));
  return [...new Set(points.filter((k) => k >= 0 && k <= steps))];
}

async function compare() {
  const steps = +$("steps").value;
  const points = switchPoints(steps);
  const seed = $("seed").value;
  const grid = $("comparison");
  grid.replaceChildren();
  $("compare").disabled = true;
  try {
    for (const [index, k] of points.entries()) {
      status(`comparing: k = ${k} (${index + 1} of ${points.length}), seed ${seed}`);
      const response = await fetch("/v1/generate", { method: "POST", headers: headers(), body: JSON.stringify(request(k)) });
      const answer = await response.json();
      if (!response.ok) throw failure(answer, response.status);
      const figure = document.createElement("figure");
      const image = document.createElement("img");
      image.src = "data:" + answer.mime_type + ";base64," + answer.image;
      const bar = document.createElement("div");
      bar.className = "bar";
      timingsBar(bar, answer.timings);
      const caption = document.createElement("figcaption");
      caption.textContent = `k = ${k}: ${answer.timings.total.toFixed(2)} s, ${answer.handoff_bytes} B`;
      figure.append(image, bar, caption);
      grid.append(figure);
    }
    showLegend();
    status(`compared ${points.length} switch points`);
  } catch (error) {
    status(error.message, true);
  } finally {
    $("compare").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
$("compare").addEventListener("click", compare);
