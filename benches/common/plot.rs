//! Line charts as SVG for BENCHMARKS.md: a log-scale x axis (connections, subscribers), a linear
//! or log-scale y axis, one polyline per series, a legend and notes on the right. Charts given
//! together are stacked in one image.

use std::fmt::Write as _;

/// One line of a chart.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    /// (x, y) in the order drawn; x > 0, and y > 0 on a log axis.
    pub points: Vec<(f64, f64)>,
}

/// One chart.
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Log-scale y axis (decades), for latencies spanning several of them.
    pub log_y: bool,
    pub series: Vec<Series>,
    /// Lines of text under the legend.
    pub notes: Vec<String>,
}

/// Colors for up to eight series.
pub const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

const WIDTH: f64 = 780.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

/// The charts, one under the other, as one SVG document.
pub fn svg(charts: &[Chart]) -> String {
    let height = HEIGHT * charts.len() as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (index, chart) in charts.iter().enumerate() {
        draw(&mut out, chart, HEIGHT * index as f64);
    }
    out.push_str("</svg>\n");
    out
}

/// Where values land on one axis: `[low, high]` onto `[0, 1]`.
struct Scale {
    low: f64,
    high: f64,
    log: bool,
}

impl Scale {
    fn fraction(&self, value: f64) -> f64 {
        if self.log {
            (value.max(self.low).ln() - self.low.ln()) / (self.high.ln() - self.low.ln())
        } else {
            (value - self.low) / (self.high - self.low)
        }
    }
}

fn draw(out: &mut String, chart: &Chart, offset: f64) {
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let top = offset + TOP;
    let points = || chart.series.iter().flat_map(|s| s.points.iter().copied());
    let finite = |v: &f64| v.is_finite() && *v > 0.0;
    let xs: Vec<f64> = points().map(|p| p.0).filter(finite).collect();
    let ys: Vec<f64> = points().map(|p| p.1).filter(finite).collect();
    let x_low = xs.iter().copied().fold(f64::INFINITY, f64::min).min(1.0);
    let x_high = xs.iter().copied().fold(1.0, f64::max).max(x_low * 2.0);
    let x_scale = Scale {
        low: x_low,
        high: x_high,
        log: true,
    };
    let y_max = ys.iter().copied().fold(1e-9, f64::max);
    let (y_scale, y_ticks) = if chart.log_y {
        let y_min = ys.iter().copied().fold(f64::INFINITY, f64::min).min(y_max);
        let low = 10f64.powf(y_min.log10().floor());
        let high = 10f64.powf(y_max.log10().ceil()).max(low * 10.0);
        let mut ticks = vec![low];
        while *ticks.last().unwrap_or(&high) < high {
            ticks.push(ticks.last().unwrap_or(&high) * 10.0);
        }
        (
            Scale {
                low,
                high,
                log: true,
            },
            ticks,
        )
    } else {
        let step = nice_step(y_max / 5.0);
        let high = (y_max / step).ceil() * step;
        let ticks = (0..=(high / step).round() as usize)
            .map(|i| i as f64 * step)
            .collect();
        (
            Scale {
                low: 0.0,
                high,
                log: false,
            },
            ticks,
        )
    };
    let x = |v: f64| LEFT + x_scale.fraction(v) * plot_w;
    let y = |v: f64| top + plot_h - y_scale.fraction(v) * plot_h;

    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"15\">{}</text>",
        LEFT + plot_w / 2.0,
        offset + 22.0,
        escape(&chart.title)
    );
    for tick in y_ticks {
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + plot_w,
            LEFT - 6.0,
            y(tick) + 4.0,
            number(tick),
            y = y(tick)
        );
    }
    let mut x_ticks = xs.clone();
    x_ticks.sort_by(f64::total_cmp);
    x_ticks.dedup();
    for tick in x_ticks {
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{top}\" y2=\"{:.1}\" stroke=\"#eee\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            top + plot_h,
            top + plot_h + 18.0,
            number(tick),
            x = x(tick)
        );
    }
    let _ = writeln!(
        out,
        "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#333\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{} (log scale)</text>\n\
         <text transform=\"translate(20 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}{}</text>",
        LEFT + plot_w / 2.0,
        offset + HEIGHT - 15.0,
        escape(&chart.x_label),
        top + plot_h / 2.0,
        escape(&chart.y_label),
        if chart.log_y { " (log scale)" } else { "" }
    );
    let legend_x = LEFT + plot_w + 12.0;
    for (index, series) in chart.series.iter().enumerate() {
        let shown: Vec<(f64, f64)> = series
            .points
            .iter()
            .copied()
            .filter(|(px, py)| finite(px) && finite(py))
            .collect();
        let line: Vec<String> = shown
            .iter()
            .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py)))
            .collect();
        let color = series.color;
        let _ = writeln!(
            out,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
            line.join(" ")
        );
        for &(px, py) in &shown {
            let _ = writeln!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{color}\"/>",
                x(px),
                y(py)
            );
        }
        let legend_y = top + 12.0 + index as f64 * 18.0;
        let _ = writeln!(
            out,
            "<line x1=\"{legend_x}\" x2=\"{:.1}\" y1=\"{legend_y:.1}\" y2=\"{legend_y:.1}\" stroke=\"{color}\" stroke-width=\"2\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            legend_x + 20.0,
            legend_x + 26.0,
            legend_y + 4.0,
            escape(&series.name)
        );
    }
    let notes_y = top + 24.0 + chart.series.len() as f64 * 18.0;
    for (index, note) in chart.notes.iter().enumerate() {
        let _ = writeln!(
            out,
            "<text x=\"{legend_x}\" y=\"{:.1}\">{}</text>",
            notes_y + index as f64 * 16.0,
            escape(note)
        );
    }
}

fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|step| *step >= raw)
        .unwrap_or(10.0 * magnitude)
}

/// 1234567 -> "1.2M", 45000 -> "45k", 0.25 -> "0.25".
pub fn number(value: f64) -> String {
    if value >= 1_000_000.0 {
        format!("{:.1}M", value / 1_000_000.0)
    } else if value >= 1000.0 {
        format!("{:.0}k", value / 1000.0)
    } else if value >= 1.0 || value == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
