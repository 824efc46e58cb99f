// Line charts on a plain <canvas>: axes with round ticks, one polyline and dots per series, a legend.
// Each draw records how many points it plotted in canvas.dataset.points (the browser test reads it).
"use strict";

window.ITRDCharts = (function () {
  function niceStep(span, ticks) {
    const raw = span / Math.max(ticks, 1);
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const unit = raw / power;
    return (unit <= 1 ? 1 : unit <= 2 ? 2 : unit <= 5 ? 5 : 10) * power;
  }

  function bounds(values, padFraction) {
    let lo = Math.min(...values), hi = Math.max(...values);
    if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
    const pad = (hi - lo) * padFraction;
    return [lo - pad, hi + pad];
  }

  function format(v) {
    const a = Math.abs(v);
    return a !== 0 && (a < 0.01 || a >= 1e5) ? v.toExponential(1) : String(Number(v.toPrecision(4)));
  }

  // series: [{name, color, points: [[x, y], ...], dashed}]; opts: {xLabel}
  function draw(canvas, series, opts) {
    const ratio = window.devicePixelRatio || 1;
    const cssW = canvas.clientWidth || canvas.width, cssH = canvas.clientHeight || canvas.height;
    canvas.width = cssW * ratio; canvas.height = cssH * ratio;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    ctx.font = "11px system-ui, sans-serif";
    const shown = series.filter(s => s.points.length > 0);
    const all = shown.flatMap(s => s.points);
    canvas.dataset.points = String(all.length);
    if (all.length === 0) {
      ctx.fillStyle = "#667085";
      ctx.fillText("no epochs finished yet", 12, cssH / 2);
      return;
    }
    const left = 52, right = 12, top = 26, bottom = 30;
    const w = cssW - left - right, h = cssH - top - bottom;
    const [x0, x1] = bounds(all.map(p => p[0]), 0);
    const [y0, y1] = bounds(all.map(p => p[1]), 0.05);
    const X = x => left + (x - x0) / (x1 - x0) * w;
    const Y = y => top + (1 - (y - y0) / (y1 - y0)) * h;

    ctx.strokeStyle = "#e4e7ec"; ctx.fillStyle = "#667085"; ctx.lineWidth = 1;
    const yStep = niceStep(y1 - y0, 5);
    for (let v = Math.ceil(y0 / yStep) * yStep; v <= y1; v += yStep) {
      ctx.beginPath(); ctx.moveTo(left, Y(v)); ctx.lineTo(left + w, Y(v)); ctx.stroke();
      ctx.textAlign = "right"; ctx.fillText(format(v), left - 6, Y(v) + 4);
    }
    const xStep = Math.max(1, niceStep(x1 - x0, 8));
    ctx.textAlign = "center";
    for (let v = Math.ceil(x0 / xStep) * xStep; v <= x1; v += xStep) {
      ctx.fillText(format(v), X(v), top + h + 16);
    }
    ctx.fillText(opts && opts.xLabel || "epoch", left + w / 2, cssH - 2);

    let legendX = left;
    for (const s of shown) {
      ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 2;
      ctx.setLineDash(s.dashed ? [6, 4] : []);
      ctx.beginPath();
      s.points.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
      ctx.stroke();
      ctx.setLineDash([]);
      if (!s.dashed) {
        for (const p of s.points) { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 2.5, 0, 2 * Math.PI); ctx.fill(); }
      }
      ctx.fillRect(legendX, 8, 12, 3);
      ctx.fillStyle = "#1d2330"; ctx.textAlign = "left";
      ctx.fillText(s.name, legendX + 16, 13);
      legendX += 24 + ctx.measureText(s.name).width;
    }
  }

  return { draw };
})();
