//! A suite's results and how they are written: `<suite>.md` (targets marked met/missed, tables,
//! plots, method), `<suite>.json` (the same plus the raw figures), PNG plots drawn with
//! plotters' bitmap backend and a font shipped in the repository, and a short summary table on
//! the terminal.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;

use crate::suites::Ctx;

/// DejaVu Sans, reduced to the characters the plots use (see `assets/fonts/README.md`).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";

/// Makes the shipped font the plots' sans-serif family.
pub fn register_font() -> anyhow::Result<()> {
    plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the bundled plot font cannot be parsed"))
}

/// One target (docs/performance-targets.md) and how the run did against it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    /// The target as the suite words it, e.g. `≥ 0.80 of the no-adapter tokens/s`.
    pub goal: String,
    pub measured: String,
    pub value: f64,
    pub threshold: f64,
    /// `None`: not judged (e.g. a GPU target measured on a CPU) — reported only.
    pub met: Option<bool>,
    pub note: String,
}

impl Target {
    /// A target met when `value >= threshold`.
    pub fn at_least(name: &str, goal: &str, value: f64, threshold: f64, measured: String) -> Self {
        Target {
            name: name.to_owned(),
            goal: goal.to_owned(),
            measured,
            value,
            threshold,
            met: Some(value.is_finite() && value >= threshold),
            note: String::new(),
        }
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    pub fn status(&self) -> &'static str {
        match self.met {
            Some(true) => "✅ met",
            Some(false) => "❌ missed",
            None => "— reported",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub title: String,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, headers: &[&str]) -> Self {
        Table {
            title: title.to_owned(),
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bar {
    pub label: String,
    pub value: f64,
    /// Whiskers (min, max).
    pub range: Option<(f64, f64)>,
    /// Colour index (bars of one kind share a colour).
    pub color: usize,
}

#[derive(Debug, Clone, Serialize)]
pub enum PlotKind {
    Lines {
        series: Vec<Series>,
        log_x: bool,
    },
    Bars {
        bars: Vec<Bar>,
    },
    /// Bars side by side per group: `series[s].values[g]` is series `s` in group `g`.
    Groups {
        groups: Vec<String>,
        series: Vec<GroupSeries>,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupSeries {
    pub name: String,
    pub values: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plot {
    /// File name inside the output directory.
    pub file: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub kind: PlotKind,
}

/// Where and how the figures were taken.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Environment {
    pub cpu: String,
    pub cores: usize,
    pub build: &'static str,
    pub preset: String,
    pub quick: bool,
    pub seed: u64,
    pub version: &'static str,
    pub suite_seconds: f64,
    pub unix_time: u64,
}

impl Environment {
    pub(crate) fn collect(ctx: &Ctx, elapsed: Duration) -> Self {
        Environment {
            cpu: cpu_name(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            build: if cfg!(debug_assertions) {
                "debug (dependencies and kernels optimised)"
            } else {
                "release"
            },
            preset: match ctx.layers {
                None => format!("{:?}", ctx.preset).to_lowercase(),
                Some(l) => format!("{:?} ({l} layers)", ctx.preset).to_lowercase(),
            },
            quick: ctx.quick,
            seed: ctx.seed,
            version: env!("CARGO_PKG_VERSION"),
            suite_seconds: elapsed.as_secs_f64(),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// The CPU's model name (`/proc/cpuinfo`), or the architecture where it is not known.
pub(crate) fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

/// Everything a suite reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub suite: &'static str,
    pub title: String,
    pub environment: Environment,
    pub targets: Vec<Target>,
    pub tables: Vec<Table>,
    pub plots: Vec<Plot>,
    /// How it was measured (paragraphs).
    pub method: Vec<String>,
    /// Where the time goes and other observations (paragraphs).
    pub findings: Vec<String>,
    /// The raw figures.
    pub data: serde_json::Value,
}

impl Report {
    pub fn new(suite: &'static str, title: &str) -> Self {
        Report {
            suite,
            title: title.to_owned(),
            environment: Environment::default(),
            targets: Vec::new(),
            tables: Vec::new(),
            plots: Vec::new(),
            method: Vec::new(),
            findings: Vec::new(),
            data: serde_json::Value::Null,
        }
    }

    /// Writes `<suite>.md`, `<suite>.json` and the plots into `out`.
    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        for plot in &self.plots {
            let path = out.join(&plot.file);
            draw(plot, &path).with_context(|| format!("drawing {}", path.display()))?;
        }
        let json = serde_json::to_string_pretty(self)? + "\n";
        let path = out.join(format!("{}.json", self.suite));
        std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
        let path = out.join(format!("{}.md", self.suite));
        std::fs::write(&path, self.markdown())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let e = &self.environment;
        let mut md = format!("# {}\n\n", self.title);
        md += &format!(
            "`loraplane-bench {}`{} · preset `{}` · {} build · {} ({} cores) · seed {} · \
             {:.0} s\n\n",
            self.suite,
            if e.quick { " --quick" } else { "" },
            e.preset,
            e.build,
            e.cpu,
            e.cores,
            e.seed,
            e.suite_seconds
        );
        if !self.targets.is_empty() {
            md += "## Targets (docs/performance-targets.md)\n\n| target | goal | measured | status |\n|---|---|---|---|\n";
            for t in &self.targets {
                md += &format!(
                    "| {} | {} | {} | {} |\n",
                    t.name,
                    t.goal,
                    t.measured,
                    t.status()
                );
            }
            for t in self.targets.iter().filter(|t| !t.note.is_empty()) {
                md += &format!("\n- *{}*: {}", t.name, t.note);
            }
            md += "\n\n";
        }
        for table in &self.tables {
            md += &format!("## {}\n\n", table.title);
            md += &markdown_table(table);
            md += "\n";
        }
        for plot in &self.plots {
            md += &format!("![{}]({})\n\n", plot.title, plot.file);
        }
        if !self.findings.is_empty() {
            md += "## Where the time goes\n\n";
            for p in &self.findings {
                md += &format!("{p}\n\n");
            }
        }
        if !self.method.is_empty() {
            md += "## Method\n\n";
            for p in &self.method {
                md += &format!("{p}\n\n");
            }
        }
        md
    }

    /// The targets and the first table, on stdout.
    pub fn print_summary(&self) {
        println!("\n== {} ==", self.title);
        for t in &self.targets {
            println!("  {:<10} {:<44} {}", t.status(), t.name, t.measured);
        }
        if let Some(table) = self.tables.first() {
            println!("{}", text_table(table));
        }
    }
}

fn markdown_table(t: &Table) -> String {
    let mut md = format!("| {} |\n|", t.headers.join(" | "));
    md += &"---|".repeat(t.headers.len());
    md += "\n";
    for row in &t.rows {
        md += &format!("| {} |\n", row.join(" | "));
    }
    md
}

fn text_table(t: &Table) -> String {
    let mut widths: Vec<usize> = t.headers.iter().map(|h| h.chars().count()).collect();
    for row in &t.rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("  {}", padded.join("  "))
    };
    let mut out = line(&t.headers);
    for row in &t.rows {
        out += "\n";
        out += &line(row);
    }
    out
}

/// `summary.md` / `summary.json` for `bench all`: every target of every suite.
pub fn write_index(out: &Path, reports: &[Report], elapsed: Duration) -> anyhow::Result<()> {
    let mut md = format!(
        "# loraplane benchmarks\n\n{} suites in {:.0} s.\n\n| suite | target | goal | measured | \
         status |\n|---|---|---|---|---|\n",
        reports.len(),
        elapsed.as_secs_f64()
    );
    for r in reports {
        for t in &r.targets {
            md += &format!(
                "| [{}]({}.md) | {} | {} | {} | {} |\n",
                r.suite,
                r.suite,
                t.name,
                t.goal,
                t.measured,
                t.status()
            );
        }
    }
    std::fs::write(out.join("summary.md"), md)?;
    let targets: Vec<serde_json::Value> = reports
        .iter()
        .flat_map(|r| {
            r.targets
                .iter()
                .map(move |t| serde_json::json!({"suite": r.suite, "target": t}))
        })
        .collect();
    let json = serde_json::json!({"seconds": elapsed.as_secs_f64(), "targets": targets});
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    Ok(())
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(90, 90, 90),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Pads a data range so points sit inside the frame.
fn padded(lo: f64, hi: f64, from_zero: bool) -> (f64, f64) {
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        (lo, hi)
    } else {
        (0.0, 1.0)
    };
    let lo = if from_zero { lo.min(0.0) } else { lo };
    let span = (hi - lo).abs().max(hi.abs() * 0.1).max(1e-9);
    (
        if from_zero && lo >= 0.0 {
            0.0
        } else {
            lo - span * 0.05
        },
        hi + span * 0.08,
    )
}

fn draw(plot: &Plot, path: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    match &plot.kind {
        PlotKind::Lines { series, log_x } => draw_lines(&root, plot, series, *log_x)?,
        PlotKind::Bars { bars } => draw_bars(&root, plot, bars)?,
        PlotKind::Groups { groups, series } => draw_groups(&root, plot, groups, series)?,
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_lines(root: &Area<'_>, plot: &Plot, series: &[Series], log_x: bool) -> anyhow::Result<()> {
    let fx = |x: f64| if log_x { x.max(1e-12).log10() } else { x };
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| fx(p.0)));
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let (y0, y1) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let (x0, x1) = padded(x0, x1, false);
    let (y0, y1) = padded(y0, y1, true);
    // Headroom above the data for the legend in the upper right.
    let y1 = y1 + (y1 - y0) * 0.2;
    let mut chart = ChartBuilder::on(root)
        .caption(&plot.title, (FAMILY, 24))
        .margin(18)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;
    let x_fmt = |v: &f64| {
        if log_x {
            let x = 10f64.powf(*v);
            if x >= 10.0 {
                format!("{x:.0}")
            } else {
                let s = format!("{x:.2}");
                s.trim_end_matches('0').trim_end_matches('.').to_owned()
            }
        } else {
            format_num(*v)
        }
    };
    chart
        .configure_mesh()
        .x_desc(plot.x_label.as_str())
        .y_desc(plot.y_label.as_str())
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&|v| format_num(*v))
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 17))
        .draw()
        .map_err(plot_err)?;
    for (i, s) in series.iter().enumerate() {
        let c = color(i);
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (fx(x), y)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(plot_err)?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(3)));
        // Markers only where there are few points (a distribution is drawn as a line).
        if pts.len() <= 40 {
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))
                .map_err(plot_err)?;
        }
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

fn draw_bars(root: &Area<'_>, plot: &Plot, bars: &[Bar]) -> anyhow::Result<()> {
    let top = bars
        .iter()
        .map(|b| b.range.map_or(b.value, |r| r.1.max(b.value)))
        .fold(0.0, f64::max);
    let (_, y1) = padded(0.0, top, true);
    let n = bars.len().max(1);
    let mut chart = ChartBuilder::on(root)
        .caption(&plot.title, (FAMILY, 24))
        .margin(18)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((0..n).into_segmented(), 0.0..y1)
        .map_err(plot_err)?;
    let label = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => bars.get(*i).map(|b| b.label.clone()).unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc(plot.x_label.as_str())
        .y_desc(plot.y_label.as_str())
        .x_labels(n)
        .x_label_formatter(&label)
        .y_label_formatter(&|v| format_num(*v))
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 17))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let mut r = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), b.value),
                ],
                color(b.color).filled(),
            );
            r.set_margin(0, 0, 12, 12);
            r
        }))
        .map_err(plot_err)?;
    chart
        .draw_series(bars.iter().enumerate().filter_map(|(i, b)| {
            let (lo, hi) = b.range?;
            Some(PathElement::new(
                vec![
                    (SegmentValue::CenterOf(i), lo),
                    (SegmentValue::CenterOf(i), hi),
                ],
                BLACK.stroke_width(2),
            ))
        }))
        .map_err(plot_err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            Text::new(
                format_num(b.value),
                (SegmentValue::CenterOf(i), b.value),
                value_style(),
            )
        }))
        .map_err(plot_err)?;
    Ok(())
}

fn value_style() -> TextStyle<'static> {
    (FAMILY, 14)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom))
}

fn draw_groups(
    root: &Area<'_>,
    plot: &Plot,
    groups: &[String],
    series: &[GroupSeries],
) -> anyhow::Result<()> {
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .fold(0.0, f64::max);
    let (_, y1) = padded(0.0, top, true);
    // Each group takes one segment per series plus a gap; its name sits under its first bar.
    let per = series.len() + 1;
    let n = groups.len().max(1) * per;
    let mut chart = ChartBuilder::on(root)
        .caption(&plot.title, (FAMILY, 24))
        .margin(18)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((0..n).into_segmented(), 0.0..y1)
        .map_err(plot_err)?;
    let label = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(j) if j % per == 0 => {
            groups.get(j / per).cloned().unwrap_or_default()
        }
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc(plot.x_label.as_str())
        .y_desc(plot.y_label.as_str())
        .x_labels(n)
        .x_label_formatter(&label)
        .y_label_formatter(&|v| format_num(*v))
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 17))
        .draw()
        .map_err(plot_err)?;
    for (si, s) in series.iter().enumerate() {
        let c = color(si);
        let at = |g: usize| g * per + si;
        chart
            .draw_series(s.values.iter().enumerate().map(|(g, v)| {
                let mut r = Rectangle::new(
                    [
                        (SegmentValue::Exact(at(g)), 0.0),
                        (SegmentValue::Exact(at(g) + 1), *v),
                    ],
                    c.filled(),
                );
                r.set_margin(0, 0, 3, 3);
                r
            }))
            .map_err(plot_err)?
            .label(s.name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], c.filled()));
        chart
            .draw_series(s.values.iter().enumerate().map(|(g, v)| {
                Text::new(
                    format_num(*v),
                    (SegmentValue::CenterOf(at(g)), *v),
                    value_style(),
                )
            }))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// A compact number for axes and labels: 3 significant digits, k/M suffixes.
pub fn format_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".to_owned()
    } else if a >= 1e6 {
        let m = format!("{:.3}", v / 1e6);
        format!("{}M", m.trim_end_matches('0').trim_end_matches('.'))
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_compact() {
        assert_eq!(format_num(0.0), "0");
        assert_eq!(format_num(1234.0), "1234");
        assert_eq!(format_num(12_345.0), "12k");
        assert_eq!(format_num(2.5e6), "2.5M");
        assert_eq!(format_num(3.456), "3.46");
        assert_eq!(format_num(0.5), "0.500");
    }

    #[test]
    fn reports_render_markdown_json_and_png() {
        register_font().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut r = Report::new("unit", "A unit report");
        r.targets
            .push(Target::at_least("ratio", "≥ 0.80", 0.9, 0.8, "0.90".into()));
        let mut t = Table::new("Results", &["a", "b"]);
        t.row(vec!["1".into(), "2".into()]);
        r.tables.push(t);
        r.plots.push(Plot {
            file: "unit-lines.png".into(),
            title: "Lines µs ≥ 1".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            kind: PlotKind::Lines {
                series: vec![Series {
                    name: "s".into(),
                    points: vec![(1.0, 2.0), (10.0, 3.0), (1000.0, 1.0)],
                }],
                log_x: true,
            },
        });
        r.plots.push(Plot {
            file: "unit-bars.png".into(),
            title: "Bars".into(),
            x_label: String::new(),
            y_label: "y".into(),
            kind: PlotKind::Bars {
                bars: vec![Bar {
                    label: "one".into(),
                    value: 2.0,
                    range: Some((1.5, 2.5)),
                    color: 0,
                }],
            },
        });
        r.plots.push(Plot {
            file: "unit-groups.png".into(),
            title: "Groups".into(),
            x_label: String::new(),
            y_label: "y".into(),
            kind: PlotKind::Groups {
                groups: vec!["g1".into(), "g2".into()],
                series: vec![
                    GroupSeries {
                        name: "a".into(),
                        values: vec![1.0, 2.0],
                    },
                    GroupSeries {
                        name: "b".into(),
                        values: vec![3.0, 0.5],
                    },
                ],
            },
        });
        r.write(dir.path()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("unit.md")).unwrap();
        assert!(md.contains("✅ met") && md.contains("![Bars](unit-bars.png)"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("unit.json")).unwrap())
                .unwrap();
        assert_eq!(json["targets"][0]["met"], true);
        for f in ["unit-lines.png", "unit-bars.png", "unit-groups.png"] {
            let bytes = std::fs::read(dir.path().join(f)).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        }
    }
}
