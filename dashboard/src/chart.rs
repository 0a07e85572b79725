//! Line charts of per-minute figures, drawn as SVG on the server: a few polylines over a
//! time axis, a value axis starting at zero with round ticks, and a legend. Written here
//! rather than through a charting crate: the charts are this small, and a crate that lays
//! out text needs font files the dashboard does not ship.

/// One line: its name and its points (time in ns, value).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(i64, f64)>,
}

/// A drawn chart: each line's SVG path, the ticks, and the size.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub unit: String,
    pub width: f64,
    pub height: f64,
    pub lines: Vec<Line>,
    /// (y, label) of each value tick.
    pub y_ticks: Vec<(f64, String)>,
    /// (x, label) of each time tick.
    pub x_ticks: Vec<(f64, String)>,
    pub plot: (f64, f64, f64, f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub name: String,
    /// `M x y L x y ...`
    pub path: String,
    /// Colour index, for the stylesheet's palette.
    pub color: usize,
    /// The last value, for the legend.
    pub last: String,
    /// Each point, drawn as a dot (a single minute is a dot, not a line).
    pub dots: Vec<(f64, f64)>,
}

const W: f64 = 520.0;
const H: f64 = 200.0;
const LEFT: f64 = 52.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 26.0;

/// A "nice" step near `raw`: 1, 2 or 5 times a power of ten.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(raw.log10().floor());
    let m = raw / power;
    let nice = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * power
}

fn value_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// `HH:MM` (UTC) of a time in ns; with the day when the range spans days.
fn time_label(ns: i64, with_day: bool) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (h, m) = (rem / 3600, (rem % 3600) / 60);
    if with_day {
        // Days since the epoch to a month and day (proleptic Gregorian).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let mo = if mp < 10 { mp + 3 } else { mp - 9 };
        format!("{mo:02}-{d:02} {h:02}:{m:02}")
    } else {
        format!("{h:02}:{m:02}")
    }
}

/// Draws `series` over `[start_ns, end_ns]`.
pub fn line_chart(title: &str, unit: &str, series: &[Series], start_ns: i64, end_ns: i64) -> Chart {
    let (px, py, pw, ph) = (LEFT, TOP, W - LEFT - RIGHT, H - TOP - BOTTOM);
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let step = nice_step(max.max(1e-9) / 4.0);
    let top = (max / step).ceil().max(1.0) * step;
    let span = (end_ns - start_ns).max(1) as f64;
    let x_of = |t: i64| px + (t - start_ns) as f64 / span * pw;
    let y_of = |v: f64| py + ph - (v / top).clamp(0.0, 1.0) * ph;
    let lines = series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut path = String::new();
            for (j, (t, v)) in s.points.iter().enumerate() {
                let cmd = if j == 0 { 'M' } else { 'L' };
                path.push_str(&format!("{cmd}{:.1} {:.1} ", x_of(*t), y_of(*v)));
            }
            Line {
                name: s.name.clone(),
                path: path.trim_end().to_string(),
                color: i % 6,
                last: s
                    .points
                    .last()
                    .map_or_else(|| "–".into(), |p| value_label(p.1)),
                dots: s.points.iter().map(|(t, v)| (x_of(*t), y_of(*v))).collect(),
            }
        })
        .collect();
    let y_ticks = (0..=((top / step).round() as usize))
        .map(|k| {
            let v = step * k as f64;
            (y_of(v), value_label(v))
        })
        .collect();
    let with_day = end_ns - start_ns > 86_400_000_000_000;
    let x_ticks = (0..=4)
        .map(|k| {
            let t = start_ns + (span * f64::from(k) / 4.0) as i64;
            (x_of(t), time_label(t, with_day))
        })
        .collect();
    Chart {
        title: title.to_string(),
        unit: unit.to_string(),
        width: W,
        height: H,
        lines,
        y_ticks,
        x_ticks,
        plot: (px, py, pw, ph),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_start_at_zero_with_round_ticks_and_lines_fit_the_plot() {
        let s = Series {
            name: "v1".into(),
            points: vec![(0, 0.0), (60_000_000_000, 7.3), (120_000_000_000, 3.0)],
        };
        let c = line_chart("rate", "req/s", &[s], 0, 120_000_000_000);
        assert_eq!(c.y_ticks.first().map(|t| t.1.as_str()), Some("0"));
        assert_eq!(c.y_ticks.last().map(|t| t.1.as_str()), Some("8"));
        assert_eq!(c.lines[0].last, "3");
        let (px, py, pw, ph) = c.plot;
        for pair in c.lines[0]
            .path
            .split(['M', 'L'])
            .filter(|p| !p.trim().is_empty())
        {
            let xy: Vec<f64> = pair
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            assert!(
                xy[0] >= px && xy[0] <= px + pw && xy[1] >= py && xy[1] <= py + ph,
                "{pair}"
            );
        }
        assert_eq!(c.x_ticks[0].1, "00:00");
        assert_eq!(c.x_ticks[4].1, "00:02");
    }

    #[test]
    fn empty_and_flat_series_still_draw() {
        let c = line_chart("rate", "req/s", &[], 0, 1);
        assert!(c.lines.is_empty());
        assert!(!c.y_ticks.is_empty());
        assert_eq!(time_label(1_764_115_200_000_000_000, true), "11-26 00:00");
    }
}
