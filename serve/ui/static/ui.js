// adapterdeck dashboard: confirmations, charts (uPlot) and the playground's streams.
// Every value from the server is set as text (textContent), never parsed as HTML.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

// Forms that change something ask first.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
    event.preventDefault();
  }
});

// {series: {label: [[x, y], ...]}, x: "step" | "time"} -> uPlot's aligned columns.
function aligned(spec) {
  const labels = Object.keys(spec.series);
  const xs = [...new Set(labels.flatMap((l) => spec.series[l].map((p) => p[0])))].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const columns = labels.map((l) => {
    const ys = new Array(xs.length).fill(null);
    for (const [x, y] of spec.series[l]) ys[index.get(x)] = y;
    return ys;
  });
  return { labels, data: [xs, ...columns] };
}

function drawChart(box) {
  if (!box.dataset.spec || typeof uPlot === "undefined") return;
  const spec = JSON.parse(box.dataset.spec);
  const { labels, data } = aligned(spec);
  if (data[0].length === 0) return;
  if (box._plot) box._plot.destroy();
  box.replaceChildren();
  const width = Math.max(280, box.clientWidth || 600);
  const opts = {
    title: box.dataset.title || "",
    width,
    height: Math.round(Math.min(320, width * 0.55)),
    scales: { x: { time: spec.x === "time" } },
    axes: [{ label: spec.x === "time" ? "" : spec.x }, {}],
    series: [{ label: spec.x }, ...labels.map((label, i) => ({
      label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
      points: { show: data[0].length < 60 },
    }))],
  };
  box._plot = new uPlot(opts, data, box);
}

function drawCharts(root) {
  root.querySelectorAll(".chart[data-spec]").forEach(drawChart);
}

document.addEventListener("DOMContentLoaded", () => drawCharts(document));
document.addEventListener("htmx:afterSwap", (event) => drawCharts(event.target));
let resizing;
window.addEventListener("resize", () => {
  clearTimeout(resizing);
  resizing = setTimeout(() => drawCharts(document), 200);
});

// The playground: one stream per chosen model, side by side.
async function streamAnswer(section, model, prompt, maxTokens) {
  const text = section.querySelector(".answer-text");
  const status = section.querySelector(".answer-status");
  section.hidden = false;
  section.querySelector(".answer-model").textContent = model;
  text.textContent = "";
  status.textContent = "streaming…";
  section.dataset.state = "streaming";
  const started = performance.now();
  try {
    const response = await fetch("/ui/playground/stream", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, prompt, max_tokens: maxTokens, csrf: csrfToken() }),
    });
    if (!response.ok) {
      status.textContent = `error ${response.status}`;
      section.dataset.state = "error";
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const event = JSON.parse(line.slice(6));
        if (event.text) text.textContent += event.text;
        if (event.error) {
          status.textContent = event.error;
          section.dataset.state = "error";
          return;
        }
        if (event.done) {
          status.textContent = `done in ${((performance.now() - started) / 1000).toFixed(1)} s`;
          section.dataset.state = "done";
        }
      }
    }
  } catch (error) {
    status.textContent = String(error);
    section.dataset.state = "error";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("playground");
  if (!form) return;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const prompt = form.querySelector("#prompt").value;
    const maxTokens = Number(form.querySelector("#max-tokens").value) || 64;
    form.querySelectorAll(".model-pick").forEach((select, i) => {
      const section = document.getElementById(`answer-${i}`);
      if (select.value) streamAnswer(section, select.value, prompt, maxTokens);
      else section.hidden = true;
    });
  });
});
