// Galaxy dashboard: polls the server's small JSON API and draws it with plain DOM and SVG.
// No framework, no build step, nothing loaded from elsewhere (the page's CSP allows only this server).
//   /dashboard/state.json     devices, the split, the engine now   (every poll, poll_s from the server)
//   /dashboard/timeline.json  the last step per device and layer   (when the engine ran a new step)
//   /dashboard/history.json   the engine's numbers over time       (every poll)
"use strict";
(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2", "#937860", "#da8bc3", "#8c8c8c",
                   "#ccb974", "#64b5cd"];
  const color = (r) => PALETTE[r % PALETTE.length];
  let pollMs = 1000;
  let shownStep = undefined;
  let planKey = "";
  let updates = 0;

  // --- small helpers -------------------------------------------------------------------------------
  function el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null) continue;
      if (k === "text") e.textContent = v;
      else if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  function svg(tag, attrs = {}, ...children) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null) continue;
      if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  const tip = (text) => svg("title", {text});
  function fmtBytes(n) {
    if (n === null || n === undefined) return "-";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
  }
  function fmtRate(bps) {
    if (!bps) return "-";
    const units = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s"];
    let i = 0;
    while (bps >= 1000 && i < units.length - 1) { bps /= 1000; i++; }
    return `${bps.toFixed(bps < 10 ? 1 : 0)} ${units[i]}`;
  }
  function fmtS(s) {
    if (s === null || s === undefined) return "-";
    if (s < 1e-3) return `${(s * 1e6).toFixed(0)} µs`;
    if (s < 1) return `${(s * 1e3).toFixed(s < 0.01 ? 2 : 1)} ms`;
    return `${s.toFixed(2)} s`;
  }
  const fmtNum = (x, d = 1) => (x === null || x === undefined ? "-" : x.toFixed(d));
  function bar(frac, text, cls = "") {
    const f = Math.max(0, Math.min(1, frac || 0));
    const fill = el("div", {class: `fill ${cls}`});
    fill.style.width = `${(f * 100).toFixed(1)}%`;
    return el("div", {class: "bar"}, fill, el("span", {class: "text", text}));
  }
  const row = (label, content) => el("div", {class: "row"}, el("span", {class: "label", text: label}), content);

  async function getJSON(path) {
    const r = await fetch(path, {cache: "no-store", credentials: "same-origin"});
    if (r.status === 401) { window.location.assign("/dashboard"); throw new Error("signed out"); }
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
    return r.json();
  }

  // --- header ---------------------------------------------------------------------------------------
  function renderHeader(s) {
    const up = s.devices.filter((d) => d.state !== "down").length;
    const parts = [];
    if (s.model) parts.push(s.served_model || s.model.name);
    else parts.push("no model loaded");
    if (s.plan && s.plan.strategy) parts.push(`${s.plan.strategy} split`);
    parts.push(`${up} of ${s.devices.length} devices up`);
    if (s.engine) parts.push(`${s.engine.running} running, ${s.engine.waiting} waiting`);
    if (!s.api) parts.push("dashboard only");
    document.getElementById("summary").textContent = parts.join(" · ");
  }
  function setLive(ok, err) {
    const live = document.getElementById("live");
    document.body.dataset.live = ok ? "true" : "false";
    live.className = `pill ${ok ? "live" : "stale"}`;
    live.textContent = ok ? `live · ${new Date().toLocaleTimeString()}` : `stale: ${err ? err.message : "?"}`;
  }

  // --- devices --------------------------------------------------------------------------------------
  function renderDevices(s) {
    const cards = s.devices.map((d) => {
      const card = el("article", {class: "device", "data-rank": d.rank, "data-name": d.name, "data-state": d.state});
      card.style.borderLeftColor = color(d.rank);
      card.append(el("h3", {}, el("span", {text: d.name}), el("span", {class: `pill ${d.state}`, text: d.state})));
      card.append(el("div", {class: "addr", text: `${d.address || d.id} · rank ${d.rank}`}));
      if (d.cpu) {
        card.append(row("CPU share", el("span", {text: `${fmtNum(d.cpu.limit, 1)} of ${d.cpu.host_cpus} cores · ` +
                                                       `${d.cpu.threads} threads`})));
      }
      if (d.cpu_use) {
        const cores = d.cpu_use.cores;
        const limit = d.cpu ? d.cpu.limit : null;
        card.append(row("CPU use", bar(cores && limit ? cores / limit : 0,
                                       cores === null ? "not reported" :
                                       `${fmtNum(cores, 2)} cores in step ${d.cpu_use.step}`)));
      }
      if (d.memory) {
        const m = d.memory;
        card.append(row("memory", bar(m.limit ? m.rss / m.limit : 0,
                                      `${fmtBytes(m.rss)} / ${fmtBytes(m.limit)} ${m.budget ? "budget" : "RAM"}`,
                                      "mem")));
      }
      if (d.kv) {
        card.append(row("KV cache", bar(d.kv.pool_bytes ? d.kv.used_bytes / d.kv.pool_bytes : 0,
                                        `${fmtBytes(d.kv.used_bytes)} of ${fmtBytes(d.kv.pool_bytes)} pool`, "kv")));
      }
      if (d.weight_bytes !== undefined) card.append(row("weights", el("span", {text: fmtBytes(d.weight_bytes)})));
      if (d.link) {
        card.append(row("link", el("span", {text: `→ rank ${d.link.to}: ${fmtRate(d.link.bandwidth_bps)}, ` +
                                                  `${fmtS(d.link.latency_s)} one-way`})));
      }
      if (d.state === "down") {
        const seen = d.last_seen_s === null ? "never answered" : `last answered ${fmtNum(d.last_seen_s, 0)} s ago`;
        card.append(el("div", {class: "err", text: `${seen}: ${d.error}`}));
      }
      return card;
    });
    document.getElementById("devices").replaceChildren(...cards);
    const note = document.getElementById("links-note");
    const measured = s.devices.some((d) => d.link);
    note.textContent = s.links_error ? `link test: ${s.links_error}` :
      measured ? "Links: each device to the next in the ring, measured with real transfers when the server started." :
      `Devices polled every ${s.poll_s} s (a hello with a ${s.timeout_s} s deadline).`;
  }

  // --- the split ------------------------------------------------------------------------------------
  const DIMS = [["heads", "query heads", "heads"], ["cols", "MLP columns", "ffn"], ["vocab", "vocabulary rows", "vocab"],
                ["layers", "layers", "layers"], ["tokens", "tokens of a prompt", null]];

  function renderPlan(plan, devices) {
    const key = JSON.stringify(plan);
    if (key === planKey) return;
    planKey = key;
    const section = document.getElementById("plan");
    section.dataset.strategy = plan.strategy || "";
    document.getElementById("plan-strategy").textContent = plan.loaded ?
      `${plan.strategy} · ${plan.model.name || plan.model.family}, ${plan.model.layers} layers` : "";
    document.getElementById("plan-reason").textContent = plan.reason;
    const names = Object.fromEntries(devices.map((d) => [d.rank, d.name]));
    document.getElementById("plan-legend").replaceChildren(...plan.devices.map((d) =>
      el("span", {}, swatch(color(d.rank)), `${names[d.rank] || d.id}`)));
    const chart = document.getElementById("plan-chart");
    const table = document.getElementById("plan-table");
    if (!plan.loaded) { chart.replaceChildren(); table.replaceChildren(); return; }
    const W = 960, label = 190, barW = W - label - 10, laneH = 22, gap = 10;
    const n = plan.devices.length;
    const rows = [];
    let y = 4;
    for (const [dim, title, total] of DIMS) {
      const overlap = plan.devices.reduce((a, d) => a + (d.share[dim][1] - d.share[dim][0]), 0) > 1.001;
      const lanes = overlap ? n : 1;
      const h = overlap ? Math.max(10, Math.min(laneH, 40 / n)) : laneH;
      const g = svg("g", {class: "plan-dim", "data-dim": dim});
      const count = total ? ` (${plan.model[total]})` : dim === "tokens" && !plan.splits_tokens ? " (all, every device)" : "";
      g.append(svg("text", {x: 0, y: y + (lanes * h) / 2 + 4, text: `${title}${count}`}));
      plan.devices.forEach((d, i) => {
        const [a, b] = d.share[dim];
        const yy = y + (overlap ? i * h : 0);
        const x = label + a * barW, w = Math.max(0, (b - a) * barW);
        const range = dim === "tokens" ? `${(100 * (b - a)).toFixed(0)}%` : `${d[dim][0]}–${d[dim][1]} (${d[dim][1] - d[dim][0]})`;
        const r = svg("rect", {x, y: yy, width: w, height: h - 2, fill: color(d.rank), class: "share",
                               "data-rank": d.rank, "data-dim": dim}, tip(`${names[d.rank] || d.id}: ${title} ${range}`));
        g.append(r);
        if (w > 70 && h >= 14) {
          g.append(svg("text", {x: x + 4, y: yy + h / 2 + 3, fill: "#fff", text: `${names[d.rank] || d.id}: ${range}`}));
        }
      });
      rows.push(g);
      y += lanes * h + gap;
    }
    chart.replaceChildren(svg("svg", {id: "plan-svg", viewBox: `0 0 ${W} ${y}`, "data-devices": n}, ...rows));
    const head = el("tr", {}, ...["device", "heads", "MLP cols", "vocab rows", "layers", "tokens",
                                  "planned compute/layer", "planned comm/layer"].map((t) => el("th", {text: t})));
    const body = plan.devices.map((d) => el("tr", {"data-rank": d.rank},
      el("td", {}, swatch(color(d.rank)), names[d.rank] || d.id),
      ...[d.heads, d.cols, d.vocab, d.layers].map((r) => el("td", {text: `${r[1] - r[0]}`})),
      el("td", {text: plan.splits_tokens ? `${(100 * (d.share.tokens[1] - d.share.tokens[0])).toFixed(0)}%` : "all"}),
      el("td", {text: d.planned ? fmtS(d.planned.compute_s) : "-"}),
      el("td", {text: d.planned ? fmtS(d.planned.comm_s) : "-"})));
    table.replaceChildren(head, ...body);
    const strat = document.getElementById("plan-strategies");
    if (plan.strategies.length) {
      strat.replaceChildren(el("tr", {}, el("th", {text: "strategy"}), el("th", {text: "predicted prefill"}),
                                   el("th", {text: "why"})),
        ...plan.strategies.map((r) => el("tr", {class: r.chosen ? "chosen" : ""}, el("td", {text: r.strategy}),
          el("td", {text: r.latency_s === null ? "infeasible" : fmtS(r.latency_s)}), el("td", {text: r.reason}))));
    } else strat.replaceChildren();
  }
  function swatch(c) {
    const s = el("span", {class: "swatch"});
    s.style.background = c;
    return s;
  }

  // --- the last step --------------------------------------------------------------------------------
  const TL = [["compute", "compute in collectives", "--compute"], ["waiting", "waiting for a peer", "--waiting"],
              ["other", "other collective work", "--other"], ["outside", "outside collectives", "--outside"],
              ["hidden", "communication hidden by overlap", "--hidden"],
              ["exposed", "communication not hidden", "--exposed"]];
  const cssVar = (v) => getComputedStyle(document.documentElement).getPropertyValue(v).trim();

  function renderTimeline(t, devices, api) {
    const section = document.getElementById("timeline");
    const caption = document.getElementById("timeline-caption");
    const chart = document.getElementById("timeline-chart");
    if (t.step === null) {
      section.dataset.step = "";
      caption.textContent = api ? "no step has run yet: send a request" :
        "this server runs no model (galaxy dashboard): `galaxy serve` shows each step here";
      chart.replaceChildren();
      return;
    }
    section.dataset.step = t.step;
    caption.textContent = `step ${t.step}: ${t.tokens} tokens of ${t.sequences} sequence(s) in ${fmtS(t.seconds)}` +
      ` · ${t.collective}` +
      ` · each device's collectives layer by layer, then its time outside them;` +
      ` communication ${t.measured_links ? "at the measured link rate" : "as time handing bytes to the transport"}`;
    document.getElementById("timeline-legend").replaceChildren(...TL.map(([, name, v]) =>
      el("span", {}, swatch(cssVar(v)), name)));
    const names = Object.fromEntries(devices.map((d) => [d.rank, d.name]));
    const W = 960, label = 110, right = 175, barW = W - label - right, mainH = 18, commH = 7, rowH = 40;
    const total = Math.max(1e-9, ...t.devices.map((d) => d.layers.reduce((a, l) => a + l.wall_s, 0) + d.outside_s));
    const sx = (s) => (s / total) * barW;
    const rows = t.devices.map((d, i) => {
      const y = 6 + i * rowH;
      const g = svg("g", {class: "tl-device", "data-rank": d.rank, "data-layers": d.layers.length});
      g.append(svg("text", {x: 0, y: y + 13, text: names[d.rank] || d.id}));
      let x = label;
      for (const l of d.layers) {
        const parts = [["compute", l.compute_s], ["waiting", l.exposed_s],
                       ["other", Math.max(0, l.wall_s - l.compute_s - l.exposed_s)]];
        const x0 = x;
        for (const [kind, s] of parts) {
          const w = sx(s);
          if (w <= 0) continue;
          g.append(svg("rect", {x, y, width: w, height: mainH, fill: cssVar(`--${kind}`), class: `seg ${kind}`},
                       tip(`${l.layer}: ${kind} ${fmtS(s)} (collectives ${fmtS(l.wall_s)}, sent ${fmtBytes(l.bytes)})`)));
          x += w;
        }
        const lw = x - x0;
        const hidden = Math.min(lw, sx(l.hidden_s)), exposed = Math.min(lw - hidden, sx(l.comm_s - l.hidden_s));
        if (hidden > 0) g.append(svg("rect", {x: x0, y: y + mainH + 2, width: hidden, height: commH,
                                              fill: cssVar("--hidden")}, tip(`${l.layer}: hidden ${fmtS(l.hidden_s)}`)));
        if (exposed > 0) g.append(svg("rect", {x: x0 + hidden, y: y + mainH + 2, width: exposed, height: commH,
                                               fill: cssVar("--exposed")},
                                       tip(`${l.layer}: not hidden ${fmtS(l.comm_s - l.hidden_s)}`)));
        if (lw > 0) g.append(svg("line", {x1: x, x2: x, y1: y, y2: y + mainH, stroke: "#fff", "stroke-width": 0.6}));
      }
      const wo = sx(d.outside_s);
      if (wo > 0) g.append(svg("rect", {x, y, width: wo, height: mainH, fill: cssVar("--outside"), class: "seg outside"},
                               tip(`outside collectives ${fmtS(d.outside_s)}`)));
      g.append(svg("text", {x: W - right + 8, y: y + 13, class: "muted",
                            text: `${fmtS(d.forward_s)} · waited ${fmtS(d.waiting_s)}`}));
      return g;
    });
    const axisY = 6 + t.devices.length * rowH;
    const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => svg("text", {x: label + f * barW - (f === 1 ? 30 : 0),
                                                                   y: axisY + 4, class: "muted",
                                                                   text: fmtS(f * total)}));
    chart.replaceChildren(svg("svg", {id: "timeline-svg", viewBox: `0 0 ${W} ${axisY + 10}`}, ...rows,
                              svg("line", {x1: label, x2: label + barW, y1: axisY - 8, y2: axisY - 8, class: "axis",
                                           stroke: "#dde1e8"}), ...ticks));
  }

  // --- over time ------------------------------------------------------------------------------------
  function lineChart(id, title, value, series, opts = {}) {
    const W = 320, H = 110, L = 58, R = 6, T = 8, B = 18;
    const now = opts.now, span = opts.span;
    let ymax = opts.ymax || 0;
    for (const s of series) for (const [, v] of s.points) if (v !== null && v > ymax) ymax = v;
    if (!(ymax > 0)) ymax = 1;
    const X = (t) => L + ((t - (now - span)) / span) * (W - L - R);
    const Y = (v) => T + (1 - v / ymax) * (H - T - B);
    const g = [svg("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#dde1e8"}),
               svg("line", {x1: L, x2: L, y1: T, y2: H - B, stroke: "#dde1e8"}),
               svg("text", {x: L - 4, y: T + 8, "text-anchor": "end", class: "muted", text: opts.fmt(ymax)}),
               svg("text", {x: L - 4, y: H - B, "text-anchor": "end", class: "muted", text: opts.fmt(0)}),
               svg("text", {x: L, y: H - 4, class: "muted", text: `-${Math.round(span)} s`}),
               svg("text", {x: W - R, y: H - 4, "text-anchor": "end", class: "muted", text: "now"})];
    for (const s of series) {
      let path = "";
      let pen = false;
      for (const [t, v] of s.points) {
        if (v === null || v === undefined) { pen = false; continue; }
        path += `${pen ? "L" : "M"}${X(t).toFixed(1)},${Y(v).toFixed(1)} `;
        pen = true;
        if (opts.dots) g.push(svg("circle", {cx: X(t), cy: Y(v), r: 2, fill: s.color}));
      }
      if (path) g.push(svg("path", {d: path, fill: "none", stroke: s.color, "stroke-width": 1.6}));
    }
    const legend = series.length > 1 ? el("div", {class: "legend"}, ...series.map((s) => el("span", {},
      swatch(s.color), s.name))) : null;
    return el("div", {class: "metric", "data-metric": id},
              el("h3", {}, el("span", {text: title}), el("span", {class: "value", text: value})),
              svg("svg", {viewBox: `0 0 ${W} ${H}`}, ...g), legend);
  }

  function renderMetrics(h, s) {
    const box = document.getElementById("metric-charts");
    const samples = h.samples;
    const now = samples.length ? samples[samples.length - 1].t : Date.now() / 1000;
    // the window grows with the data, from a minute up to the whole history the server keeps
    const kept = h.size * h.interval_s;
    const age = samples.length ? now - samples[0].t : 0;
    const span = Math.min(kept, Math.max(60, Math.ceil(age / 60) * 60));
    document.getElementById("metrics-window").textContent =
      `the last ${span < 120 ? `${Math.round(span)} s` : `${Math.round(span / 60)} min`}` +
      ` (the server keeps ${Math.round(kept / 60)} min), sampled every ${h.interval_s} s`;
    const pts = (key, f = (v) => v) => samples.map((x) => [x.t, x[key] === undefined || x[key] === null ? null : f(x[key])]);
    const last = (key) => { for (let i = samples.length - 1; i >= 0; i--) if (samples[i][key] !== null && samples[i][key] !== undefined) return samples[i][key]; return null; };
    const o = {now, span};
    const charts = [];
    const e = s.engine;
    if (e) {
      charts.push(lineChart("requests", "requests", `${e.running} running · ${e.waiting} waiting`,
        [{name: "running", color: color(0), points: pts("running")},
         {name: "waiting", color: color(1), points: pts("waiting")}], {...o, fmt: (v) => v.toFixed(0)}));
      charts.push(lineChart("ttft", "time to first token", fmtS(last("ttft_s")),
        [{name: "TTFT", color: color(2), points: pts("ttft_s")}], {...o, fmt: fmtS, dots: true}));
      charts.push(lineChart("tpot", "time per output token", fmtS(last("tpot_s")),
        [{name: "TPOT", color: color(3), points: pts("tpot_s")}], {...o, fmt: fmtS, dots: true}));
      charts.push(lineChart("tokens_per_s", "tokens / s", fmtNum(last("tokens_per_s"), 1),
        [{name: "tokens/s", color: color(4), points: pts("tokens_per_s")}], {...o, fmt: (v) => v.toFixed(0)}));
      charts.push(lineChart("kv_blocks_used", "KV blocks used (same ids on every device)",
        `${e.kv_blocks_used} of ${e.kv_blocks}`, [{name: "used", color: color(2), points: pts("kv_blocks_used")}],
        {...o, fmt: (v) => v.toFixed(0), ymax: e.kv_blocks}));
      charts.push(lineChart("prefix_hit_rate", "prefix-cache hit rate",
        e.prefix_hit_rate === null ? "-" : `${(100 * e.prefix_hit_rate).toFixed(0)}%`,
        [{name: "hit rate", color: color(5), points: pts("prefix_hit_rate")}],
        {...o, fmt: (v) => `${(100 * v).toFixed(0)}%`, ymax: 1}));
    }
    const names = s.devices.map((d) => d.name);
    charts.push(lineChart("rss", "memory per device (resident)", "",
      names.map((n, r) => ({name: n, color: color(r),
                            points: samples.map((x) => [x.t, x.rss && x.rss[r] !== undefined ? x.rss[r] : null])})),
      {...o, fmt: fmtBytes}));
    box.replaceChildren(...charts);
  }

  // --- the loop -------------------------------------------------------------------------------------
  async function tick() {
    try {
      const s = await getJSON("/dashboard/state.json");
      pollMs = Math.max(250, (s.poll_s || 1) * 1000);
      renderHeader(s);
      renderDevices(s);
      renderPlan(s.plan, s.devices);
      const step = s.engine ? s.engine.steps : null;
      if (step !== shownStep) {
        renderTimeline(await getJSON("/dashboard/timeline.json"), s.devices, s.api);
        shownStep = step;
      }
      renderMetrics(await getJSON("/dashboard/history.json"), s);
      updates += 1;
      document.body.dataset.updates = updates;
      setLive(true);
    } catch (err) {
      setLive(false, err);
    }
    window.setTimeout(tick, pollMs);
  }
  tick();
})();
