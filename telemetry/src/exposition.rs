//! Prometheus exposition, written once for both formats a scraper may ask for: the text
//! format 0.0.4, and OpenMetrics 1.0 when the `Accept` header prefers it (as Prometheus itself
//! does). Used by the service's own metrics and by the mesh's aggregated families.

use std::fmt::Write as _;

/// `text/plain; version=0.0.4` or OpenMetrics 1.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the `Accept` header lists `application/openmetrics-text` with a
    /// quality above the text format's; the text format otherwise.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text;
        };
        let mut openmetrics = 0.0_f32;
        let mut text = 0.0_f32;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
        }
    }
}

/// Writes families one after another: [`Writer::family`] once, then its samples.
#[derive(Debug)]
pub struct Writer {
    out: String,
    format: Format,
    /// The current family's sample name (a counter's `_total` name in OpenMetrics).
    sample_name: String,
}

impl Writer {
    pub fn new(format: Format, capacity: usize) -> Writer {
        Writer {
            out: String::with_capacity(capacity),
            format,
            sample_name: String::new(),
        }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Starts a family: HELP and TYPE. In OpenMetrics a counter's family name has no
    /// `_total` and its samples do; in the text format both are `name` as given.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let family = match (self.format, kind) {
            (Format::OpenMetrics, Kind::Counter) => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        self.sample_name.clear();
        self.sample_name.push_str(family);
        if self.format == Format::OpenMetrics && kind == Kind::Counter {
            self.sample_name.push_str("_total");
        }
        let _ = write!(self.out, "# HELP {family} ");
        escape_help(&mut self.out, help, self.format);
        let _ = writeln!(self.out, "\n# TYPE {family} {}", kind.word());
    }

    /// One sample of the current family: `suffix` (`_bucket`, `_sum`, `_count` or empty),
    /// `labels` already rendered as `a="x",b="y"` (see [`render_labels`]), and one more label
    /// (a bucket's `le`) if given.
    pub fn sample(&mut self, suffix: &str, labels: &str, extra: Option<(&str, &str)>, value: f64) {
        let out = &mut self.out;
        out.push_str(&self.sample_name);
        out.push_str(suffix);
        if !labels.is_empty() || extra.is_some() {
            out.push('{');
            out.push_str(labels);
            if let Some((k, v)) = extra {
                if !labels.is_empty() {
                    out.push(',');
                }
                out.push_str(k);
                out.push_str("=\"");
                out.push_str(v);
                out.push('"');
            }
            out.push('}');
        }
        out.push(' ');
        write_value(out, value);
        out.push('\n');
    }

    /// A sample whose labels are given as pairs (escaped here).
    pub fn sample_pairs(&mut self, suffix: &str, labels: &[(&str, &str)], value: f64) {
        let rendered = render_labels(labels.iter().copied());
        self.sample(suffix, &rendered, None, value);
    }

    /// The exposition, with OpenMetrics' closing `# EOF`.
    pub fn finish(mut self) -> String {
        if self.format == Format::OpenMetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }
}

/// `a="x",b="y"`, values escaped (backslash, double quote, newline) for both formats.
pub fn render_labels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escape_value(&mut out, v);
        out.push('"');
    }
    out
}

fn escape_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(out: &mut String, help: &str, format: Format) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if format == Format::OpenMetrics => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// A sample value as both formats spell it: whole numbers without a fraction, `+Inf`,
/// `-Inf`, `NaN`.
pub fn write_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 9.0e15 {
        // Exact: |v| < 2^53, so the cast loses nothing.
        let mut buf = itoa::Buffer::new();
        out.push_str(buf.format(v as i64));
    } else {
        let mut buf = ryu::Buffer::new();
        out.push_str(buf.format_finite(v));
    }
}

/// A metric or label name made valid: characters outside `[a-zA-Z0-9_:]` become `_`, and
/// a leading digit gets a `_` before it (as Prometheus' OTLP translation does).
pub fn sanitize_name(name: &str, allow_colon: bool) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    if name.starts_with(|c: char| c.is_ascii_digit()) || name.is_empty() {
        out.push('_');
    }
    for c in name.chars() {
        let ok = c.is_ascii_alphanumeric() || c == '_' || (allow_colon && c == ':');
        out.push(if ok { c } else { '_' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_prometheus_accept_header() {
        // What Prometheus 2.42 sends.
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(
            Format::negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
    }

    #[test]
    fn counters_are_named_as_each_format_wants() {
        for (format, family, sample) in [
            (
                Format::Text,
                "# TYPE x_total counter",
                "x_total{a=\"1\"} 3\n",
            ),
            (
                Format::OpenMetrics,
                "# TYPE x counter",
                "x_total{a=\"1\"} 3\n",
            ),
        ] {
            let mut w = Writer::new(format, 0);
            w.family("x_total", Kind::Counter, "Things.");
            w.sample_pairs("", &[("a", "1")], 3.0);
            let out = w.finish();
            assert!(out.contains(family), "{out}");
            assert!(out.contains(sample), "{out}");
            assert_eq!(out.ends_with("# EOF\n"), format == Format::OpenMetrics);
        }
    }

    #[test]
    fn values_and_labels_are_spelled_safely() {
        let mut s = String::new();
        for v in [1.0, 0.5, -2.0, f64::INFINITY, f64::NAN, 1e300] {
            write_value(&mut s, v);
            s.push(' ');
        }
        assert_eq!(s, "1 0.5 -2 +Inf NaN 1e300 ");
        assert_eq!(render_labels([("a", "q\"b\\c\nd")]), r#"a="q\"b\\c\nd""#);
        assert_eq!(sanitize_name("http.method", false), "http_method");
        assert_eq!(sanitize_name("9x:y", true), "_9x:y");
    }
}
