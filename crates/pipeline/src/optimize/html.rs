//! `OUT/report.html`: one self-contained file (inline SVG drawn by plotters' SVG backend, laid out by a
//! minijinja template; no JavaScript, nothing fetched).

use plotters::prelude::*;
use serde::Serialize;

use super::goal::Objective;
use super::search::{LayerRow, Outcome, Trial};
use super::store::StageRecord;

const TEMPLATE: &str = include_str!("report.html.j2");
const GREEN: RGBColor = RGBColor(23, 128, 61);
const RED: RGBColor = RGBColor(180, 35, 24);
const CHOSEN: RGBColor = RGBColor(37, 99, 235);

/// What the report shows: a search's outcome and/or a recipe's stages, and the peers' rows.
pub struct Input<'a> {
    pub model: &'a str,
    pub family: &'a str,
    pub search: Option<&'a Outcome>,
    pub stages: &'a [StageRecord],
    pub layers: &'a [LayerRow],
    pub peers: &'a [serde_json::Value],
}

#[derive(Serialize)]
struct Row {
    name: String,
    quality: String,
    size: String,
    memory: String,
    latency: String,
    throughput: String,
}

/// A point of a chart: (x, y, passed, chosen).
type Point = (f64, f64, bool, bool);

fn scatter(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    pts: &[Point],
    base: Option<(f64, f64)>,
    threshold: Option<f64>,
    front: &[(f64, f64)],
) -> String {
    let mut svg = String::new();
    if pts.is_empty() {
        return svg;
    }
    let xs = pts.iter().map(|p| p.0).chain(base.map(|b| b.0));
    let ys = pts.iter().map(|p| p.1).chain(base.map(|b| b.1)).chain(threshold);
    let (x0, x1) = bounds(xs);
    let (y0, y1) = bounds(ys);
    {
        let root = SVGBackend::with_string(&mut svg, (540, 360)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let Ok(mut c) = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(38)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
        else {
            return String::new();
        };
        let _ = c.configure_mesh().x_desc(x_desc).y_desc(y_desc).light_line_style(WHITE.mix(0.0)).draw();
        if let Some(t) = threshold {
            let _ = c.draw_series(DashedLineSeries::new([(x0, t), (x1, t)], 6, 4, BLACK.mix(0.5).stroke_width(1)));
        }
        if front.len() > 1 {
            let _ = c.draw_series(LineSeries::new(front.iter().copied(), GREEN.mix(0.6).stroke_width(1)));
        }
        if let Some(b) = base {
            let _ = c.draw_series(std::iter::once(TriangleMarker::new(b, 7, BLACK.filled())));
        }
        let _ = c.draw_series(pts.iter().map(|&(x, y, ok, chosen)| {
            let color = if chosen {
                CHOSEN
            } else if ok {
                GREEN
            } else {
                RED
            };
            Circle::new((x, y), if chosen { 6 } else { 4 }, color.filled())
        }));
        let _ = root.present();
    }
    svg
}

fn bounds(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = v.filter(|x| x.is_finite()).collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.01).max(1e-6);
    (lo - pad, hi + pad)
}

/// The Pareto front of (x to minimise, quality) points, quality better when `lower` is false.
fn pareto(mut pts: Vec<(f64, f64)>, lower_better: bool) -> Vec<(f64, f64)> {
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut front: Vec<(f64, f64)> = Vec::new();
    for p in pts {
        let better = |q: f64, r: f64| if lower_better { q < r } else { q > r };
        if front.last().is_none_or(|l| better(p.1, l.1)) {
            front.push(p);
        }
    }
    front
}

fn measured(o: &Outcome) -> impl Iterator<Item = (&Trial, &super::goal::Figures)> {
    o.trials.iter().filter_map(|t| t.figures.as_ref().map(|f| (t, f)))
}

/// Renders the report.
pub fn render(inp: &Input) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.add_template("report.html", TEMPLATE).map_err(|e| e.to_string())?;
    let mut ctx = serde_json::Map::new();
    let name =
        std::path::Path::new(inp.model).file_name().map_or(inp.model.to_string(), |n| n.to_string_lossy().to_string());
    ctx.insert("model_name".into(), name.into());
    ctx.insert("family".into(), inp.family.into());
    ctx.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    ctx.insert("mode".into(), if inp.search.is_some() { "search" } else { "recipe" }.into());
    if let Some(o) = inp.search {
        let decoder =
            matches!(o.goal.metric, super::goal::Metric::Ppl | super::goal::Metric::Kld | super::goal::Metric::Cloze);
        let metric = o.goal.metric.name();
        let lower = o.goal.metric.lower_is_better();
        ctx.insert("metric".into(), metric.into());
        let chosen = o.chosen.map(|c| &o.trials[c]);
        let fmt_q = |v: f64| format!("{v:.4}");
        ctx.insert(
            "search".into(),
            serde_json::json!({
                "met": o.met,
                "chosen_name": chosen.map(|t| t.name.clone()),
                "chosen_quality": chosen.and_then(|t| t.figures.as_ref()).map(|f| fmt_q(f.quality)),
                "chosen_drop": chosen.map(|t| format!("{:+.2}% / {:+.4}", 100.0 * t.drop_rel, t.drop_abs)),
                "baseline_quality": fmt_q(o.baseline.quality),
                "threshold": fmt_q(o.threshold),
                "level": o.goal.level.name(),
                "level_text": o.goal.level.describe(),
                "max_drop": o.goal.max_drop.to_string(),
                "objective": o.goal.objective.name(),
                "budget": format!("{:.0}s", o.goal.budget),
                "max_trials": o.goal.max_trials.map_or("-".to_string(), |m| m.to_string()),
                "seed": o.goal.seed,
                "candidates": o.candidates,
                "trials": o.trials.len(),
                "clock": format!("{:.0}s", o.clock),
                "stopped": o.stopped,
            }),
        );
        let speed = |f: &super::goal::Figures| {
            (
                f.latency_ms.map_or("-".into(), |l| format!("{l:.2} {}", if decoder { "ms/token" } else { "ms" })),
                f.throughput.map_or("-".into(), |t| format!("{t:.1} {}", if decoder { "tok/s" } else { "sent/s" })),
            )
        };
        let row = |name: &str, f: &super::goal::Figures| {
            let (latency, throughput) = speed(f);
            Row {
                name: name.into(),
                quality: fmt_q(f.quality),
                size: format!("{:.2}", f.bytes as f64 / 1e6),
                memory: format!("{:.2}", f.memory_bytes as f64 / 1e6),
                latency,
                throughput,
            }
        };
        let mut compare = vec![row("baseline", &o.baseline)];
        if let Some(t) = chosen {
            if let Some(f) = &t.figures {
                compare.push(row(&format!("chosen: {}", t.name), f));
            }
        }
        ctx.insert("compare".into(), serde_json::to_value(compare).unwrap_or_default());
        let mb = |f: &super::goal::Figures| f.bytes as f64 / 1e6;
        let pts_size: Vec<Point> =
            measured(o).map(|(t, f)| (mb(f), f.quality, t.passed, Some(t.n) == o.chosen)).collect();
        let front = pareto(pts_size.iter().map(|p| (p.0, p.1)).collect(), lower);
        ctx.insert(
            "chart_size".into(),
            scatter(
                &format!("{metric} vs size"),
                "MB on disk",
                metric,
                &pts_size,
                Some((mb(&o.baseline), o.baseline.quality)),
                Some(o.threshold),
                &front,
            )
            .into(),
        );
        let lat_pts: Vec<Point> = measured(o)
            .filter_map(|(t, f)| f.latency_ms.map(|l| (l, f.quality, t.passed, Some(t.n) == o.chosen)))
            .collect();
        if lat_pts.len() == measured(o).count() {
            let front = pareto(lat_pts.iter().map(|p| (p.0, p.1)).collect(), lower);
            let unit = Objective::Latency.unit(decoder);
            ctx.insert(
                "chart_latency".into(),
                scatter(
                    &format!("{metric} vs latency"),
                    unit,
                    metric,
                    &lat_pts,
                    o.baseline.latency_ms.map(|l| (l, o.baseline.quality)),
                    Some(o.threshold),
                    &front,
                )
                .into(),
            );
        }
        let hist: Vec<Point> =
            measured(o).map(|(t, f)| (t.clock / 60.0, f.quality, t.passed, Some(t.n) == o.chosen)).collect();
        ctx.insert(
            "chart_history".into(),
            scatter(
                &format!("{metric} of each trial over the search"),
                "minutes since the start",
                metric,
                &hist,
                None,
                Some(o.threshold),
                &[],
            )
            .into(),
        );
        let rows: Vec<serde_json::Value> = o
            .trials
            .iter()
            .map(|t| {
                let (q, size, (lat, thr)) = match &t.figures {
                    Some(f) => (fmt_q(f.quality), format!("{:.2}", mb(f)), speed(f)),
                    None => ("-".into(), "-".into(), ("-".into(), "-".into())),
                };
                serde_json::json!({
                    "n": t.n + 1, "name": t.name, "quality": q, "size": size, "latency": lat, "throughput": thr,
                    "drop": if t.drop_rel.is_finite() { format!("{:+.2}%", 100.0 * t.drop_rel) } else { "-".into() },
                    "seconds": format!("{:.0}", t.seconds),
                    "class": if t.passed { "ok" } else { "miss" },
                    "result": if Some(t.n) == o.chosen { "chosen".to_string() } else if t.passed { "met".into() } else if let Some(e) = &t.error { format!("failed: {e}") } else { "missed".into() },
                })
            })
            .collect();
        ctx.insert("trial_rows".into(), rows.into());
        let probes: Vec<serde_json::Value> = o
            .probes
            .iter()
            .map(|p| serde_json::json!({"group": p.group, "gtype": p.gtype, "kld": format!("{:.5}", p.kld), "seconds": format!("{:.0}", p.seconds)}))
            .collect();
        ctx.insert("probes".into(), probes.into());
    }
    if !inp.stages.is_empty() {
        let rows: Vec<serde_json::Value> = inp
            .stages
            .iter()
            .map(|s| serde_json::json!({"n": s.index + 1, "kind": s.kind, "line": s.line, "seconds": format!("{:.1}", s.seconds), "summary": s.summary.join("; ")}))
            .collect();
        ctx.insert("stages".into(), rows.into());
    }
    if !inp.peers.is_empty() {
        let mut header: Vec<String> = Vec::new();
        for p in inp.peers {
            if let Some(o) = p.as_object() {
                for k in o.keys() {
                    if !header.contains(k) {
                        header.push(k.clone());
                    }
                }
            }
        }
        let rows: Vec<Vec<String>> =
            inp.peers.iter().map(|p| header.iter().map(|h| p.get(h).map_or(String::new(), cell)).collect()).collect();
        ctx.insert("peer_header".into(), serde_json::to_value(header).unwrap_or_default());
        ctx.insert("peers".into(), serde_json::to_value(rows).unwrap_or_default());
    }
    if !inp.layers.is_empty() {
        let (kinds, rows) = layer_grid(inp.layers);
        ctx.insert("layers".into(), true.into());
        ctx.insert("layer_kinds".into(), serde_json::to_value(kinds).unwrap_or_default());
        ctx.insert("layer_rows".into(), rows.into());
    }
    let tmpl = env.get_template("report.html").map_err(|e| e.to_string())?;
    // The SVG strings come from plotters and go in unescaped (`|safe` in the template); every other value
    // is escaped by the template engine.
    tmpl.render(minijinja::Value::from_serialize(serde_json::Value::Object(ctx))).map_err(|e| e.to_string())
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Number(n) => {
            n.as_f64().map_or(n.to_string(), |f| if f.fract() == 0.0 { format!("{f:.0}") } else { format!("{f:.4}") })
        }
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Blocks × Linear kinds, each cell coloured by bits per weight.
fn layer_grid(layers: &[LayerRow]) -> (Vec<String>, Vec<serde_json::Value>) {
    let mut kinds: Vec<String> = Vec::new();
    let mut blocks: Vec<(String, Vec<(String, &LayerRow)>)> = Vec::new();
    // Block Linears only (the head and poolers are listed by their own storage in report.json).
    for l in layers.iter().filter(|l| whittle_models::Model::is_block_linear(&l.layer)) {
        let (block, kind) = split_layer(&l.layer);
        if !kinds.contains(&kind) {
            kinds.push(kind.clone());
        }
        match blocks.iter_mut().find(|b| b.0 == block) {
            Some(b) => b.1.push((kind, l)),
            None => blocks.push((block, vec![(kind, l)])),
        }
    }
    let rows = blocks
        .into_iter()
        .map(|(block, cells)| {
            let cells: Vec<serde_json::Value> = kinds
                .iter()
                .map(|k| match cells.iter().find(|c| &c.0 == k) {
                    Some((_, l)) => {
                        let mut text = format!("{:.1}b", l.bpw);
                        if l.density < 0.999 {
                            text += &format!(" {:.0}%", 100.0 * l.density);
                        }
                        if let Some(r) = l.rank {
                            text += &format!(" r{r}");
                        }
                        serde_json::json!({"text": text, "color": bpw_color(l.bpw), "title": format!("{} {} {}x{}", l.layer, l.storage, l.shape.0, l.shape.1)})
                    }
                    None => serde_json::json!({"text": "removed", "color": "#eee", "title": ""}),
                })
                .collect();
            serde_json::json!({"block": block, "cells": cells})
        })
        .collect();
    (kinds, rows)
}

fn split_layer(name: &str) -> (String, String) {
    let parts: Vec<&str> = name.split('.').collect();
    if let Some(i) = parts.iter().position(|p| p.parse::<usize>().is_ok()) {
        return (parts[i].to_string(), parts[i + 1..].join("."));
    }
    ("-".into(), name.to_string())
}

/// Light for few bits, dark for many (2 → 32 bits on a log scale).
fn bpw_color(bpw: f64) -> String {
    let t = ((bpw.max(1.0).log2() - 1.0) / 4.0).clamp(0.0, 1.0);
    let r = (255.0 - 120.0 * t) as u8;
    let g = (240.0 - 80.0 * t) as u8;
    let b = (200.0 + 40.0 * t) as u8;
    format!("#{r:02x}{g:02x}{b:02x}")
}
