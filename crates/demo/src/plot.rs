//! `lunmpio demo --plot FILE.svg`: per-path throughput over time, phases shaded, faults marked.
//! Written by hand (plain SVG 1.1, no script, no external resources).

use std::fmt::Write as _;

/// One sample of the live view: seconds since start, MiB/s per path.
#[derive(Debug, Clone)]
pub struct Sample {
    pub t: f64,
    pub mib_per_s: Vec<f64>,
}

/// A vertical marker: a fault injected or cleared.
#[derive(Debug, Clone)]
pub struct Marker {
    pub t: f64,
    pub label: String,
    /// A fault (red) or a recovery / policy change (green).
    pub fault: bool,
}

/// A shaded span: one phase of the scenario.
#[derive(Debug, Clone)]
pub struct Span {
    pub start: f64,
    pub end: f64,
    pub label: String,
}

const COLOURS: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

pub fn render(
    title: &str,
    paths: &[String],
    samples: &[Sample],
    markers: &[Marker],
    spans: &[Span],
) -> String {
    const W: f64 = 1000.0;
    const H: f64 = 520.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 150.0;
    const TOP: f64 = 70.0;
    const BOTTOM: f64 = 50.0;
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let t_max = samples
        .last()
        .map(|s| s.t)
        .into_iter()
        .chain(spans.iter().map(|s| s.end))
        .fold(1.0_f64, f64::max);
    let y_max = nice_ceiling(
        samples
            .iter()
            .flat_map(|s| s.mib_per_s.iter().copied())
            .fold(1.0_f64, f64::max),
    );
    let x = |t: f64| LEFT + (t / t_max).clamp(0.0, 1.0) * plot_w;
    let y = |v: f64| TOP + plot_h - (v / y_max).clamp(0.0, 1.0) * plot_h;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, "<title>{}</title>", escape(title));
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="24" font-size="16" font-weight="bold">{}</text>"#,
        escape(title)
    );
    // Phases.
    for (i, span) in spans.iter().enumerate() {
        let (x0, x1) = (x(span.start), x(span.end));
        let fill = if i % 2 == 0 { "#f2f2f2" } else { "#e6eef7" };
        let _ = writeln!(
            s,
            r#"<rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{plot_h}" fill="{fill}"/>"#,
            (x1 - x0).max(0.0)
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#555" transform="rotate(-90 {:.1} {:.1})">{}</text>"##,
            x0 + 12.0,
            TOP + plot_h - 4.0,
            x0 + 12.0,
            TOP + plot_h - 4.0,
            escape(&format!("{}. {}", i + 1, span.label))
        );
    }
    // Axes and grid.
    for i in 0..=5 {
        let v = y_max * f64::from(i) / 5.0;
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ccc" stroke-width="0.5"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            yy + 4.0,
            trim_number(v)
        );
    }
    let step = tick_step(t_max);
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let xx = x(t);
        let _ = writeln!(
            s,
            r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + plot_h + 16.0,
            trim_number(t)
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time (s)</text>"#,
        LEFT + plot_w / 2.0,
        H - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">throughput per path (MiB/s)</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    // Faults and recoveries.
    for (i, m) in markers.iter().enumerate() {
        let xx = x(m.t);
        let colour = if m.fault { "#d62728" } else { "#2ca02c" };
        let _ = writeln!(
            s,
            r#"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="{colour}" stroke-width="1.5" stroke-dasharray="5,3"/>"#,
            TOP + plot_h
        );
        let label_y = TOP - 6.0 - 14.0 * (i % 3) as f64;
        let _ = writeln!(
            s,
            r#"<text x="{xx:.1}" y="{label_y:.1}" font-size="11" fill="{colour}" text-anchor="middle">{}</text>"#,
            escape(&m.label)
        );
    }
    // One line per path.
    for (p, name) in paths.iter().enumerate() {
        let colour = COLOURS[p % COLOURS.len()];
        let points: Vec<String> = samples
            .iter()
            .map(|smp| {
                let v = smp.mib_per_s.get(p).copied().unwrap_or(0.0);
                format!("{:.1},{:.1}", x(smp.t), y(v))
            })
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            points.join(" ")
        );
        let ly = TOP + 10.0 + 18.0 * p as f64;
        let lx = LEFT + plot_w + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"/>"#,
            lx + 20.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 26.0,
            ly + 4.0,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn trim_number(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    let exp = v.max(1e-9).log10().floor();
    let base = 10f64.powf(exp);
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * base >= v {
            return m * base;
        }
    }
    10.0 * base
}

fn tick_step(t_max: f64) -> f64 {
    nice_ceiling(t_max / 10.0).max(0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_escaped_svg() {
        let svg = render(
            "a <demo> & more",
            &["p0".into(), "p1".into()],
            &[
                Sample {
                    t: 0.0,
                    mib_per_s: vec![1.0, 2.0],
                },
                Sample {
                    t: 1.0,
                    mib_per_s: vec![3.0, 0.0],
                },
            ],
            &[Marker {
                t: 0.5,
                label: "p0 down".into(),
                fault: true,
            }],
            &[Span {
                start: 0.0,
                end: 1.0,
                label: "all".into(),
            }],
        );
        assert!(svg.contains("a &lt;demo&gt; &amp; more"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(120.0), 200.0);
    }
}
