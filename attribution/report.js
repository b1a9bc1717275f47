"use strict";
// headsteer report.html renderer: reads the JSON blob of the page and draws it (SVG, no libraries).
// Every string from the data goes into the page as text (textContent / text nodes), never as markup.
(function () {
  const D = JSON.parse(document.getElementById("headsteer-data").textContent);
  const app = document.getElementById("app");
  const SVG_NS = "http://www.w3.org/2000/svg"; // the SVG namespace name (an identifier, nothing is fetched)
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];

  function add(e, kids) {
    for (const c of kids.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  function setAttrs(e, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    return e;
  }
  function h(tag, attrs, ...kids) { return add(setAttrs(document.createElement(tag), attrs), kids); }
  function s(tag, attrs, ...kids) { return add(setAttrs(document.createElementNS(SVG_NS, tag), attrs), kids); }

  const ok = (v) => v !== null && v !== undefined && Number.isFinite(v);
  function fmt(v, d = 3) { return ok(v) ? Number(v).toFixed(d) : "–"; }
  function pct(v, d = 1) { return ok(v) ? (100 * v).toFixed(d) + "%" : "–"; }
  function headName(i, H) { return "L" + Math.floor(i / H) + "H" + (i % H); }
  function key(v) { return Number(v).toString(); }

  // -- tooltip --
  const tip = h("div", { class: "tip", role: "tooltip" });
  document.body.append(tip);
  function showTip(ev, lines) {
    tip.replaceChildren(...lines.map((l, i) => h("div", i ? {} : { class: "tt" }, l)));
    tip.style.display = "block";
    const r = tip.getBoundingClientRect(), pad = 14;
    let x = ev.clientX + pad, y = ev.clientY + pad;
    if (x + r.width > window.innerWidth) x = Math.max(0, ev.clientX - r.width - pad);
    if (y + r.height > window.innerHeight) y = Math.max(0, ev.clientY - r.height - pad);
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }
  function hideTip() { tip.style.display = "none"; }

  // -- colours --
  function mix(c0, c1, u) {
    u = Math.max(0, Math.min(1, u));
    return "rgb(" + c0.map((x, i) => Math.round(x + (c1[i] - x) * u)).join(",") + ")";
  }
  const WHITE = [247, 247, 247], BLUE = [33, 102, 172], RED = [178, 24, 43], SEQ = [127, 39, 4], SEQ0 = [255, 245, 235];
  function scaleOf(vals) {
    const v = vals.filter(ok);
    const lo = v.length ? Math.min(...v) : 0, hi = v.length ? Math.max(...v) : 1;
    if (lo >= 0) {
      const m = hi || 1;
      return { lo: 0, hi: m, f: (x) => (ok(x) ? mix(SEQ0, SEQ, x / m) : "#ccc") };
    }
    const m = Math.max(Math.abs(lo), Math.abs(hi)) || 1;
    return { lo: -m, hi: m, f: (x) => (ok(x) ? (x < 0 ? mix(WHITE, BLUE, -x / m) : mix(WHITE, RED, x / m)) : "#ccc") };
  }
  function colorbar(sc, width, label) {
    const n = 48, w = width / n, svg = s("svg", { width: width + 20, height: 38, class: "colorbar" });
    for (let j = 0; j < n; j++) {
      const x = sc.lo + ((j + 0.5) / n) * (sc.hi - sc.lo);
      svg.append(s("rect", { x: 10 + j * w, y: 2, width: w + 0.5, height: 10, fill: sc.f(x) }));
    }
    svg.append(s("text", { x: 10, y: 25, class: "ax" }, fmt(sc.lo)));
    svg.append(s("text", { x: 10 + width, y: 25, class: "ax", "text-anchor": "end" }, fmt(sc.hi)));
    if (sc.lo < 0) svg.append(s("text", { x: 10 + width / 2, y: 25, class: "ax", "text-anchor": "middle" }, "0"));
    svg.append(s("text", { x: 10 + width / 2, y: 36, class: "ax", "text-anchor": "middle" }, label));
    return svg;
  }

  // -- the layer x head grid --
  function grid(vals, L, H, opts) {
    const c = opts.cell || Math.max(9, Math.min(40, Math.floor(560 / H))), left = 34, top = 16;
    const W = left + H * c + 4, HH = top + L * c + 4;
    const sc = scaleOf(vals);
    const svg = s("svg", { width: W, height: HH, class: "grid", "data-grid": opts.id || "" });
    const every = Math.ceil(12 / c);
    for (let hh = 0; hh < H; hh += every)
      svg.append(s("text", { x: left + hh * c + c / 2, y: 11, class: "ax", "text-anchor": "middle" }, hh));
    for (let l = 0; l < L; l += every)
      svg.append(s("text", { x: left - 4, y: top + l * c + c / 2 + 4, class: "ax", "text-anchor": "end" }, "L" + l));
    const marks = opts.marks || new Set();
    for (let i = 0; i < L * H; i++) {
      const l = Math.floor(i / H), hh = i % H;
      const r = s("rect", {
        x: left + hh * c, y: top + l * c, width: c - 1, height: c - 1, fill: sc.f(vals[i]), class: "cell",
        "data-head": "L" + l + "H" + hh, "data-value": ok(vals[i]) ? vals[i] : "",
        stroke: marks.has(i) ? "#111" : null, "stroke-width": marks.has(i) ? 1.5 : null,
      });
      r.addEventListener("mousemove", (ev) => showTip(ev, opts.hover(i)));
      r.addEventListener("mouseleave", hideTip);
      svg.append(r);
    }
    return h("div", { class: "gridwrap" }, h("div", { class: "note" }, "head →  (rows: layers)"), svg,
      h("div", {}, colorbar(sc, Math.max(120, Math.min(W - 20, 260)), opts.label || "")));
  }

  // -- line charts (curves, flow) --
  function ticks(lo, hi, n) {
    const span = hi - lo || 1, step0 = span / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => span / st <= n) || 10 * mag;
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9 * span; t += step) out.push(+t.toFixed(10));
    return out;
  }
  function lineChart(o) {
    // o: {xs, xlabels?, series: [{name, ys, lo?, hi?, color, width?, dash?}], title, xlabel, ylabel, yfmt, ylim?, refs?}
    const W = o.width || 500, HH = o.height || 300, m = { l: 66, r: 12, t: 22, b: 40 };
    const pw = W - m.l - m.r, ph = HH - m.t - m.b;
    const xs = o.xs, x0 = Math.min(...xs), x1 = Math.max(...xs);
    let all = [];
    for (const se of o.series) all = all.concat(se.ys, se.lo || [], se.hi || []);
    all = all.filter(ok).concat(o.ylim || []);
    let y0 = all.length ? Math.min(...all) : 0, y1 = all.length ? Math.max(...all) : 1;
    if (y0 === y1) { y0 -= 1; y1 += 1; }
    const pad = 0.04 * (y1 - y0);
    y0 -= pad; y1 += pad;
    const X = (x) => m.l + (x1 === x0 ? pw / 2 : ((x - x0) / (x1 - x0)) * pw);
    const Y = (y) => m.t + (1 - (y - y0) / (y1 - y0)) * ph;
    const svg = s("svg", { width: W, height: HH, class: "chart", "data-chart": o.id || "" });
    svg.append(s("text", { x: m.l, y: 14, class: "title" }, o.title || ""));
    const yt = ticks(y0, y1, 5), step = yt.length > 1 ? yt[1] - yt[0] : 1;
    for (const t of yt) {
      svg.append(s("line", { x1: m.l, x2: m.l + pw, y1: Y(t), y2: Y(t), stroke: t === 0 ? "#999" : "#eee" }));
      svg.append(s("text", { x: m.l - 5, y: Y(t) + 4, class: "ax", "text-anchor": "end" }, (o.tickfmt || o.yfmt)(t, step)));
    }
    for (const r of o.refs || []) svg.append(s("line", { x1: m.l, x2: m.l + pw, y1: Y(r), y2: Y(r), stroke: "#bbb", "stroke-dasharray": "2,3" }));
    const xt = o.xlabels ? xs.map((x, i) => [x, o.xlabels[i]]) : ticks(x0, x1, 8).map((t) => [t, String(t)]);
    const everyX = Math.ceil(xt.length / 12);
    xt.forEach(([x, lab], i) => {
      if (i % everyX) return;
      svg.append(s("text", { x: X(x), y: m.t + ph + 15, class: "ax", "text-anchor": "middle" }, lab));
    });
    svg.append(s("rect", { x: m.l, y: m.t, width: pw, height: ph, fill: "none", stroke: "#bbb" }));
    svg.append(s("text", { x: m.l + pw / 2, y: HH - 6, class: "ax", "text-anchor": "middle" }, o.xlabel || ""));
    svg.append(s("text", { x: 12, y: m.t + ph / 2, class: "ax", "text-anchor": "middle", transform: `rotate(-90 12 ${m.t + ph / 2})` }, o.ylabel || ""));
    const groups = [];
    for (const se of o.series) {
      const g = s("g", { class: "series", "data-series": se.name });
      if (se.lo && se.hi) {
        let seg = [];
        const flush = () => {
          if (seg.length > 1) {
            const pts = seg.map((i) => X(xs[i]) + "," + Y(se.hi[i])).concat(seg.slice().reverse().map((i) => X(xs[i]) + "," + Y(se.lo[i])));
            g.append(s("polygon", { points: pts.join(" "), fill: se.color, opacity: 0.12, stroke: "none" }));
          }
          seg = [];
        };
        xs.forEach((_, i) => (ok(se.lo[i]) && ok(se.hi[i]) ? seg.push(i) : flush()));
        flush();
      }
      let d = "", pen = false;
      xs.forEach((x, i) => {
        if (!ok(se.ys[i])) { pen = false; return; }
        d += (pen ? "L" : "M") + X(x).toFixed(1) + " " + Y(se.ys[i]).toFixed(1);
        pen = true;
      });
      g.append(s("path", { d, fill: "none", stroke: se.color, "stroke-width": se.width || 1.6, "stroke-dasharray": se.dash || null }));
      if (xs.length <= 40) xs.forEach((x, i) => ok(se.ys[i]) && g.append(s("circle", { cx: X(x), cy: Y(se.ys[i]), r: 2.2, fill: se.color })));
      groups.push(g);
      svg.append(g);
    }
    const cursor = s("line", { y1: m.t, y2: m.t + ph, stroke: "#555", "stroke-width": 0.8, visibility: "hidden" });
    svg.append(cursor);
    const hit = s("rect", { x: m.l, y: m.t, width: pw, height: ph, fill: "transparent" });
    hit.addEventListener("mousemove", (ev) => {
      const box = svg.getBoundingClientRect(), px = ev.clientX - box.left;
      let best = 0;
      xs.forEach((x, i) => { if (Math.abs(X(x) - px) < Math.abs(X(xs[best]) - px)) best = i; });
      cursor.setAttribute("x1", X(xs[best]));
      cursor.setAttribute("x2", X(xs[best]));
      cursor.setAttribute("visibility", "visible");
      const lines = [(o.xname || "x") + " " + (o.xlabels ? o.xlabels[best] : xs[best])];
      o.series.forEach((se, j) => {
        if (groups[j].getAttribute("visibility") === "hidden") return;
        let t = se.name + ": " + o.yfmt(se.ys[best]);
        if (se.lo && se.hi) t += (o.bandWord || " [") + o.yfmt(se.lo[best]) + ", " + o.yfmt(se.hi[best]) + "]";
        if (se.extra) t += se.extra(best);
        lines.push(t);
      });
      showTip(ev, lines);
    });
    hit.addEventListener("mouseleave", () => { cursor.setAttribute("visibility", "hidden"); hideTip(); });
    svg.append(hit);
    const legend = h("div", { class: "legend" });
    o.series.forEach((se, j) => {
      const item = h("span", { title: "click to hide or show" }, h("i", { class: "sw", style: `background:${se.color}` }), se.name);
      item.addEventListener("click", () => {
        const off = groups[j].getAttribute("visibility") === "hidden";
        groups[j].setAttribute("visibility", off ? "visible" : "hidden");
        item.classList.toggle("off", !off);
      });
      legend.append(item);
    });
    return h("div", { class: "chartwrap" }, svg, legend);
  }

  function table(head, rows, cls) {
    return h("table", { class: cls || "" }, h("tr", {}, head.map((c, i) => h("th", { class: i ? "" : "l" }, c))),
      rows.map((r) => h("tr", {}, r.map((c, i) => h("td", { class: i ? "" : "l" }, c)))));
  }
  function facts(pairs) {
    return h("table", { class: "facts" }, pairs.filter((p) => p[1] !== null && p[1] !== undefined).map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v))));
  }
  function orderOf(vals) {
    const idx = vals.map((_, i) => i);
    const v = (i) => (ok(vals[i]) ? vals[i] : -Infinity);
    idx.sort((a, b) => v(b) - v(a) || a - b);
    return idx;
  }

  // ================= attribute =================
  function attribute() {
    const L = D.L, H = D.H, N = L * H, st = D.settings || {};
    const state = { rate: 0, metric: "score", image: 0 };
    const statName = st.statistic || "statistic";
    add(app, [
      h("h1", {}, "Head attribution: which heads carry the image into the answer"),
      facts([
        ["images attributed", `${D.n_images} (clean accuracy ${pct(D.clean_accuracy)})`],
        ["statistic", `answer ${statName}` + (statName === "margin" ? " (answer logit minus the best other answer of the data set)" : "")],
        ["ablation rate(s)", D.rates.map((r) => r.alpha).join(", ") + (D.rates.length > 1 ? ` (primary: ${D.primary_alpha})` : "")],
        ["scorer", st.scorer ? st.scorer + ({ coar: " (random ablation masks, regression)", atp: " (one forward and backward: first-order estimate)",
          "atp*": " (gradients with the QK fix and GradDrop)", "grad-coar": " (COAR's coefficients from gradients at random masks)" }[st.scorer] || "") : null],
        ["masks per image and rate", !st.scorer || st.scorer === "coar" ? st.masks : st.scorer === "grad-coar" ? st.grad_masks : null],
        ["fit", !st.scorer || st.scorer === "coar" ? st.method : null],
        ["baseline", D.baseline ? JSON.stringify(D.baseline) : null],
        ["held-out images (curves)", D.held_out ? String(D.held_out.n_images) : null],
      ]),
    ]);
    if (D.curves && D.curves.headline) {
      for (const [c, text] of Object.entries(D.curves.headline)) app.append(h("div", { class: "headline" }, h("b", {}, c + ": "), text));
    }

    // controls shared by the grid and the per-image view
    const controls = h("div", { class: "controls" });
    const rateSel = h("select", { id: "rate" });
    D.rates.forEach((r, i) => rateSel.append(new Option(`alpha ${r.alpha}` + (i === 0 ? " (primary)" : ""), String(i))));
    if (D.rates.length > 1) controls.append(h("span", {}, h("label", { for: "rate" }, "ablation rate "), rateSel));
    const metrics = [["score", "attribution score"], ["stderr", "stderr of the score (over images)"], ["topk_freq", "top-5 frequency over images"]];
    if (D.single) metrics.push(["single", "single-head ablation drop"], ["attention", "attention to the image"]);
    const metricSel = h("select", { id: "metric" });
    for (const [k, lab] of metrics) metricSel.append(new Option(lab, k));
    controls.append(h("span", {}, h("label", { for: "metric" }, "colour by "), metricSel));

    app.append(h("h2", {}, "Layer × head grid"));
    app.append(h("p", { class: "note" }, "Score: the drop of the answer's " + statName + " when the head's image flow is ablated, from the linear fit over random masks (larger = more important; below 0: ablating it raises the answer). Hover a cell for all its numbers; outlined cells are the top 5 of the selected rate."));
    app.append(controls);
    const gridBox = h("div", { class: "row", id: "grid" });
    app.append(gridBox);

    const curveBox = h("div", { id: "curves" });
    app.append(h("h2", {}, "Faithfulness and completeness"));
    app.append(curveBox);

    app.append(h("h2", {}, "Same class vs same appearance"));
    similarity();

    app.append(h("h2", {}, "Per image"));
    const imgBox = h("div", { id: "image" });
    const imgSel = h("select", { id: "image-select" });
    D.per_image.forEach((r, i) => imgSel.append(new Option(`#${r.index}: ${r.question} → ${r.answer}` + (r.correct === false ? " (answered wrong)" : ""), String(i))));
    app.append(h("div", { class: "controls" }, h("span", {}, h("label", { for: "image-select" }, "attributed image "), imgSel)));
    app.append(imgBox);

    function rate() { return D.rates[state.rate]; }
    function metricVals(m, r) {
      return m === "score" ? r.mean : m === "stderr" ? r.stderr : m === "topk_freq" ? r.topk_freq : m === "single" ? D.single : D.attention;
    }
    function metricLabel(m) { return metrics.find((x) => x[0] === m)[1]; }

    function drawGrid() {
      const r = rate(), order = orderOf(r.mean), rank = new Array(N);
      order.forEach((i, j) => (rank[i] = j + 1));
      const hover = (i) => {
        const z = r.stderr[i], lines = [`${headName(i, H)}: rank ${rank[i]} of ${N} (alpha ${r.alpha})`,
          `score ${fmt(r.mean[i])} ± ${fmt(z)} stderr over images (≈95% interval [${fmt(r.mean[i] - 1.96 * z)}, ${fmt(r.mean[i] + 1.96 * z)}])`,
          `top-5 frequency over images: ${fmt(r.topk_freq[i], 2)}`];
        if (D.single) lines.push(`single-head ablation drop: ${fmt(D.single[i])}`, `attention to the image: ${fmt(D.attention[i])}`);
        return lines;
      };
      const top = order.slice(0, Math.min(10, N));
      const rows = top.map((i, j) => [String(j + 1), headName(i, H), fmt(r.mean[i]), fmt(r.stderr[i]),
        `[${fmt(r.mean[i] - 1.96 * r.stderr[i])}, ${fmt(r.mean[i] + 1.96 * r.stderr[i])}]`, fmt(r.topk_freq[i], 2),
        ...(D.single ? [fmt(D.single[i]), fmt(D.attention[i])] : [])]);
      const side = h("div", { class: "side" }, h("h3", {}, `Top heads (alpha ${r.alpha})`),
        table(["rank", "head", "score", "stderr", "≈95% interval", "top-5 freq", ...(D.single ? ["single-head drop", "attention to image"] : [])], rows));
      const fc = r.fit_correlation;
      if (fc) side.append(h("p", { class: "note" }, `Linear-fit correlation on held-out masks (not faithfulness): Pearson ${fmt(fc.pearson)}, Spearman ${fmt(fc.spearman)}.`));
      const ac = r.attention_correlation;
      if (ac) side.append(h("p", { class: "note" }, `Spearman between score and attention to the image, over heads: ${fmt(ac.spearman)} (mean of per-image ones ${fmt(ac.spearman_per_image_mean)}).`));
      const lp = r.layer_profile;
      if (lp) side.append(h("h3", {}, `Where the top ${lp.top_n} heads sit`),
        table(["layer", ...lp.count_per_layer.map((_, l) => "L" + l)],
          [["heads among the top", ...lp.count_per_layer.map(String)], ["share of positive score", ...lp.mass_per_layer.map((x) => fmt(x, 2))]]));
      gridBox.replaceChildren(grid(metricVals(state.metric, r), L, H, { id: "aggregate", hover, marks: new Set(order.slice(0, 5)), label: metricLabel(state.metric) }), side);
    }

    function drawCurves() {
      const c = D.curves;
      if (!c) {
        const why = D.held_out && D.held_out.note ? D.held_out.note : "not computed for this run (--no-compare)";
        curveBox.replaceChildren(h("p", { class: "note" }, "Curves: " + why + "."));
        return;
      }
      const names = Object.keys(c.rankings), sel = rate().ranking;
      const color = (n, j) => (n === "random" ? "#888" : PALETTE[j % PALETTE.length]);
      const charts = ["faithfulness", "completeness"].map((cv) => lineChart({
        id: cv, xs: c.k, xname: "k =", xlabel: "k heads", ylabel: "share of the answer's gap", yfmt: (v) => fmt(v, 2),
        title: cv === "faithfulness" ? "faithfulness: keep only the top-k heads" : "completeness: ablate only the top-k heads",
        refs: [0.5, 0.8, 0.9], ylim: [0, 1], bandWord: " 95% BCa [",
        series: names.map((n, j) => ({
          name: n, ys: c.rankings[n][cv].mean, lo: c.rankings[n][cv].low, hi: c.rankings[n][cv].high, color: color(n, j),
          width: n === sel ? 3 : 1.5, dash: n === "random" ? "5,4" : null,
          extra: (i) => { const a = c.rankings[n][cv === "faithfulness" ? "accuracy_keep" : "accuracy_ablate"]; return a ? ` (accuracy ${fmt(a[i], 2)})` : ""; },
        })),
      }));
      const K = c.k[c.k.length - 1];
      const need = (d) => (!d ? "–" : `${d.k === null ? ">" + K : d.k} [${d.low === null ? ">" + K : d.low}, ${d.high === null ? ">" + K : d.high}]`);
      const rows = names.map((n) => [n, ...["faithfulness", "completeness"].flatMap((cv) => ["0.5", "0.8", "0.9"].map((lv) => need(((c.heads_needed || {})[n] || {})[cv] && c.heads_needed[n][cv][lv])))]);
      const d = c.denominator || {};
      curveBox.replaceChildren(
        h("p", { class: "note" }, `Mean over ${d.n_used} of ${d.n_images} held-out images (95% BCa band); 1 = the whole gap between the clean ${c.statistic || "statistic"} and all heads ablated. The thick line is the selected rate's ranking; click a legend entry to hide it.`),
        h("div", { class: "row" }, charts),
        h("h3", {}, "Heads needed: smallest k reaching the level [95% bootstrap interval]"),
        table(["ranking", "faithfulness 50%", "80%", "90%", "completeness 50%", "80%", "90%"], rows));
      if (D.regimes) {
        curveBox.append(table(["regime", "best rate", "mean over k per rate", "lead over runner-up [95%]"],
          Object.entries(D.regimes).map(([k, g]) => [k.replace("_", "-"), String(g.alpha),
            Object.entries(g.mean_over_k).map(([a, v]) => `${a}: ${fmt(v)}`).join(", "),
            g.lead === undefined ? "–" : `${fmt(g.lead)} [${fmt(g.lead_low)}, ${fmt(g.lead_high)}]` + (g.clear ? "" : " (not clear)")])));
      }
    }

    function similarity() {
      const sim = D.similarity;
      if (!sim || !Object.keys(sim).length) {
        app.append(h("p", { class: "note" }, "Not computed: it needs at least 4 attributed easy-VQA images whose shape and colour are both known (cosine of per-image score vectors within and across classes)."));
        return;
      }
      app.append(h("p", { class: "note" }, "Mean similarity of the per-image score vectors (primary rate) between pairs of images: if the heads follow the semantic class, same-class pairs score higher than same-appearance ones."));
      app.append(table(["pairs of images", "cosine", "Spearman", "pairs"],
        Object.entries(sim).map(([k, v]) => [k.replaceAll("_", " "), fmt(v.cosine), fmt(v.spearman), String(v.pairs)]), "sim"));
    }

    function drawImage() {
      const r = D.per_image[state.image];
      if (!r) { imgBox.replaceChildren(h("p", { class: "note" }, "No attributed images.")); return; }
      const R = rate(), sc = r.scores[R.key], order = orderOf(sc), agg = orderOf(R.mean), aggRank = new Array(N);
      agg.forEach((i, j) => (aggRank[i] = j + 1));
      const im = r.image ? D.images[r.image] : null;
      const pics = h("div", { class: "thumbs" });
      if (im) {
        const zoom = Math.max(1, Math.floor(192 / Math.max(im.w, im.h))), w = im.w * zoom, hh = im.h * zoom;
        pics.append(h("figure", {}, h("div", { class: "stack" }, h("img", { src: im.src, width: w, height: hh, alt: "attributed image" })),
          h("figcaption", {}, `the image (${im.size[0]}×${im.size[1]} px)`)));
        if (im.mask) {
          pics.append(h("figure", {}, h("div", { class: "stack" }, h("img", { src: im.src, width: w, height: hh, alt: "" }),
            h("img", { src: im.mask, width: w, height: hh, class: "ov", alt: "object mask" })),
            h("figcaption", {}, `its object mask: background dimmed, object outlined (${pct(im.object_share, 0)} of the pixels; from the data's ${im.mask_from === "box" ? "box column" : "object mask"}). headsteer flow splits the image tokens into object and background patches by it.`)));
        } else {
          pics.append(h("p", { class: "note" }, "This data has no object mask or box for this image: the image only. (easy-VQA has a mask per image; a local data file gets one from its box column.)"));
        }
      } else {
        pics.append(h("p", { class: "note" }, "No image stored in this report for this example."));
      }
      const info = facts([["question", r.question], ["answer", r.answer], ["question type", r.qtype],
        ["answered correctly", r.correct === null || r.correct === undefined ? null : r.correct ? "yes" : "no"],
        [`clean ${statName}`, fmt(r.clean)], ["linear-fit Pearson (held-out masks)", fmt(r.fit_pearson)], ["image id", r.image_id === null ? null : String(r.image_id)]]);
      const m = state.metric, own = m === "single" || m === "attention" ? r[m] : sc;
      const hover = (i) => {
        const lines = [`${headName(i, H)} in image #${r.index}`, `score ${fmt(sc[i])} (this image; rank ${order.indexOf(i) + 1}), aggregate rank ${aggRank[i]}`];
        if (r.single) lines.push(`single-head ablation drop: ${fmt(r.single[i])}`, `attention to the image: ${fmt(r.attention[i])}`);
        return lines;
      };
      const top = order.slice(0, Math.min(5, N));
      const tbl = table(["rank", "head", "score", ...(r.single ? ["single-head drop", "attention to image"] : []), "aggregate rank"],
        top.map((i, j) => [String(j + 1), headName(i, H), fmt(sc[i]), ...(r.single ? [fmt(r.single[i]), fmt(r.attention[i])] : []), String(aggRank[i])]));
      const label = (m === "single" || m === "attention" ? metricLabel(m) : "attribution score") + " (this image)";
      imgBox.replaceChildren(h("div", { class: "row" }, h("div", {}, pics, info),
        h("div", { class: "side" }, h("h3", {}, `This image's top heads (alpha ${R.alpha})`), tbl,
          grid(own, L, H, { id: "image", hover, marks: new Set(top), label, cell: Math.max(9, Math.min(28, Math.floor(420 / H))) }))));
    }

    rateSel.addEventListener("change", () => { state.rate = +rateSel.value; drawGrid(); drawCurves(); drawImage(); });
    metricSel.addEventListener("change", () => { state.metric = metricSel.value; drawGrid(); drawImage(); });
    imgSel.addEventListener("change", () => { state.image = +imgSel.value; drawImage(); });
    drawGrid();
    drawCurves();
    drawImage();
  }

  // ================= flow =================
  function flow() {
    const F = D.flow, wins = F.windows, measure = F.measure;
    const yfmt = measure === "logit_diff" ? (v) => (ok(v) ? (v >= 0 ? "+" : "") + v.toFixed(3) : "–") : (v) => (ok(v) ? (v >= 0 ? "+" : "") + (100 * v).toFixed(1) + "%" : "–");
    add(app, [
      h("h1", {}, "Token-level information flow (attention knockout)"),
      facts([["images", String(F.n_images)], ["measure", `${measure}: ${D.words}`], ["layer window", D.settings.window ? String(D.settings.window) : null],
        ["images left out", F.excluded_images ? String(F.excluded_images) : null],
        ["full image knockout (mean change of the answer logit)", ok(F.image_effect_mean) ? fmt(F.image_effect_mean) : null]]),
      h("h2", {}, "Effect of knocking out each edge, layer window by layer window"),
      h("p", { class: "note" }, "Each line: the edge (source → target token group) knocked out in every head of one window of layers; band ±1 stderr over images. Hover for the values; click a legend entry to hide it."),
    ]);
    const xs = wins.map((w) => (w[0] + w[1]) / 2), xlabels = wins.map((w) => (w[0] === w[1] ? "L" + w[0] : `L${w[0]}-${w[1]}`));
    const names = Object.keys(F.edges);
    const series = names.map((e, j) => {
      const ys = F.edges[e], se = (F.stderr || {})[e] || ys.map(() => null);
      return { name: e, ys, lo: ys.map((v, i) => (ok(v) && ok(se[i]) ? v - se[i] : null)), hi: ys.map((v, i) => (ok(v) && ok(se[i]) ? v + se[i] : null)), color: PALETTE[j % PALETTE.length] };
    });
    const digits = (st, scale) => Math.max(0, -Math.floor(Math.log10(st * scale) + 1e-9));
    const tickfmt = measure === "logit_diff" ? (v, st) => v.toFixed(digits(st, 1)) : (v, st) => (100 * v).toFixed(digits(st, 100)) + "%";
    app.append(lineChart({ id: "flow", xs, xlabels, xname: "window", xlabel: "layer window", ylabel: D.ylabel, yfmt, tickfmt, series, width: 760, height: 380, bandWord: " ±1 stderr [" }));
    app.append(h("h3", {}, "Values"));
    app.append(table(["edge", ...xlabels], names.map((e) => [e, ...F.edges[e].map(yfmt)]), "flowtable"));
    if (F.restricted) {
      app.append(h("h3", {}, `Knocked out only in the attributed heads (${F.heads}) vs random heads of the same count (all layers)`));
      app.append(table(["edge", "attributed heads", "random heads"], Object.entries(F.restricted).map(([e, v]) => [e, yfmt(v.attributed), yfmt(v.random)])));
    }
    app.append(h("h2", {}, "Summary"));
    app.append(h("ul", {}, D.lines.map((l) => h("li", {}, l.replace(/^- /, "")))));
  }

  try {
    if (D.kind === "attribute") attribute();
    else if (D.kind === "flow") flow();
    else app.append(h("p", {}, "unknown report kind"));
    document.body.setAttribute("data-rendered", "yes");
  } catch (err) {
    app.append(h("pre", { class: "bad" }, "report failed to render: " + err));
    throw err;
  }
})();
