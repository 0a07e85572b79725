//! The telemetry service's own health on `GET /metrics`, in Prometheus text format 0.0.4:
//! what it ingested and refused (by reason), its WAL, flushes and compactions, its files,
//! its buffer and its queries. Every metric name is written here and nowhere else.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::query::QueryStats;
use crate::store::{Store, Table};

/// Why an OTLP request was refused, as the `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not well-formed protobuf.
    Malformed,
    /// Larger than the whole buffer could ever hold.
    TooLarge,
    /// The buffer is full until a flush frees room.
    BufferFull,
    /// Every request slot was taken.
    Busy,
    /// The WAL could not store it.
    Unavailable,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Refusal::Malformed,
        Refusal::TooLarge,
        Refusal::BufferFull,
        Refusal::Busy,
        Refusal::Unavailable,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::TooLarge => "too_large",
            Refusal::BufferFull => "buffer_full",
            Refusal::Busy => "busy",
            Refusal::Unavailable => "unavailable",
        }
    }
}

/// OTLP signals, as the `signal` label says them.
pub const SIGNALS: [&str; 3] = ["traces", "metrics", "logs"];

/// Counters of the OTLP receiver.
#[derive(Debug, Default)]
pub struct IngestStats {
    accepted: [AtomicU64; SIGNALS.len()],
    refused: [[AtomicU64; Refusal::ALL.len()]; SIGNALS.len()],
}

impl IngestStats {
    pub fn accepted(&self, signal: usize) {
        if let Some(c) = self.accepted.get(signal) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn refused(&self, signal: usize, why: Refusal) {
        let i = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
        if let Some(c) = self.refused.get(signal).and_then(|r| r.get(i)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn refused_count(&self, signal: usize, why: Refusal) -> u64 {
        let i = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.refused
            .get(signal)
            .and_then(|r| r.get(i))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// One metric family being written: HELP and TYPE once, then its samples.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out, name }
    }

    fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.out, "{}{suffix}", self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn load(c: &AtomicU64) -> f64 {
    c.load(Ordering::Relaxed) as f64
}

/// The whole exposition.
pub fn render(store: &Store, ingest: &IngestStats, queries: &QueryStats) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let tables = store.tables();

    let mut f = Family::new(
        &mut out,
        "lumen_telemetry_otlp_requests_accepted_total",
        "counter",
        "OTLP export requests stored durably and acknowledged.",
    );
    for (i, signal) in SIGNALS.iter().enumerate() {
        f.sample("", &[("signal", signal)], load(&ingest.accepted[i]));
    }
    let mut f = Family::new(
        &mut out,
        "lumen_telemetry_otlp_requests_refused_total",
        "counter",
        "OTLP export requests refused, by reason.",
    );
    for (i, signal) in SIGNALS.iter().enumerate() {
        for (j, why) in Refusal::ALL.iter().enumerate() {
            f.sample(
                "",
                &[("signal", signal), ("reason", why.label())],
                load(&ingest.refused[i][j]),
            );
        }
    }
    let mut f = Family::new(
        &mut out,
        "lumen_telemetry_rows_ingested_total",
        "counter",
        "Rows stored durably, by table.",
    );
    for t in tables {
        f.sample("", &[("table", t.name)], load(&t.stats.rows_ingested));
    }

    let wal = store.wal_stats();
    Family::new(
        &mut out,
        "lumen_telemetry_wal_records_total",
        "counter",
        "Records appended to the write-ahead log.",
    )
    .sample("", &[], load(&wal.records));
    Family::new(
        &mut out,
        "lumen_telemetry_wal_written_bytes_total",
        "counter",
        "Bytes appended to the write-ahead log.",
    )
    .sample("", &[], load(&wal.bytes));
    Family::new(
        &mut out,
        "lumen_telemetry_wal_fsyncs_total",
        "counter",
        "fsyncs of the write-ahead log (one per group commit).",
    )
    .sample("", &[], load(&wal.fsyncs));
    Family::new(
        &mut out,
        "lumen_telemetry_wal_disk_bytes",
        "gauge",
        "Bytes of write-ahead log segments on disk.",
    )
    .sample("", &[], store.wal_disk_bytes() as f64);

    let budget = store.budget();
    Family::new(
        &mut out,
        "lumen_telemetry_buffered_bytes",
        "gauge",
        "Bytes of rows held in memory (memtables and requests being converted).",
    )
    .sample("", &[], budget.used() as f64);
    Family::new(
        &mut out,
        "lumen_telemetry_buffered_bytes_limit",
        "gauge",
        "The cap on buffered bytes (--max-buffered-mib).",
    )
    .sample("", &[], budget.cap() as f64);
    let mut f = Family::new(
        &mut out,
        "lumen_telemetry_buffered_rows",
        "gauge",
        "Rows in the memtable, not yet in Parquet, by table.",
    );
    for t in tables {
        f.sample("", &[("table", t.name)], t.buffered_rows() as f64);
    }

    let mut f = Family::new(
        &mut out,
        "lumen_telemetry_flush_duration_seconds",
        "summary",
        "Time spent flushing memtables to Parquet, by table.",
    );
    for t in tables {
        let labels = [("table", t.name)];
        f.sample("_sum", &labels, load(&t.stats.flush_micros) / 1e6);
        f.sample("_count", &labels, load(&t.stats.flushes));
    }
    let mut f = Family::new(
        &mut out,
        "lumen_telemetry_flush_failures_total",
        "counter",
        "Flushes that failed (their rows stay in the WAL and memtable), by table.",
    );
    for t in tables {
        f.sample("", &[("table", t.name)], load(&t.stats.flush_failures));
    }
    let mut f = Family::new(
        &mut out,
        "lumen_telemetry_compaction_duration_seconds",
        "summary",
        "Time spent merging files, by table.",
    );
    for t in tables {
        let labels = [("table", t.name)];
        f.sample("_sum", &labels, load(&t.stats.compaction_micros) / 1e6);
        f.sample("_count", &labels, load(&t.stats.compactions));
    }
    let mut f = Family::new(
        &mut out,
        "lumen_telemetry_files_expired_total",
        "counter",
        "Files dropped by retention, by table.",
    );
    for t in tables {
        f.sample("", &[("table", t.name)], load(&t.stats.files_expired));
    }
    for (name, help, counter) in [
        (
            "lumen_telemetry_compactions_spliced_total",
            "Compactions that copied their inputs' row groups as they were instead of re-encoding every row, by table.",
            (|t: &Table| load(&t.stats.compactions_spliced)) as fn(&Table) -> f64,
        ),
        (
            "lumen_telemetry_object_store_uploads_total",
            "Parquet files uploaded to the object store (--object-store), by table.",
            |t: &Table| load(&t.stats.remote_uploads),
        ),
        (
            "lumen_telemetry_object_store_upload_bytes_total",
            "Bytes of Parquet files uploaded to the object store, by table.",
            |t: &Table| load(&t.stats.remote_upload_bytes),
        ),
        (
            "lumen_telemetry_object_store_failures_total",
            "Object store operations that failed (uploads, manifests, deletions, peer reads), by table.",
            |t: &Table| load(&t.stats.remote_failures),
        ),
    ] {
        let mut f = Family::new(&mut out, name, "counter", help);
        for t in tables {
            f.sample("", &[("table", t.name)], counter(t));
        }
    }
    let files: Vec<_> = tables.iter().map(|t| (t.name, t.files())).collect();
    let mut f = Family::new(
        &mut out,
        "lumen_telemetry_files",
        "gauge",
        "Parquet files in the manifest, by table.",
    );
    for (name, list) in &files {
        f.sample("", &[("table", name)], list.len() as f64);
    }
    let mut f = Family::new(
        &mut out,
        "lumen_telemetry_file_bytes",
        "gauge",
        "Bytes of Parquet files in the manifest, by table.",
    );
    for (name, list) in &files {
        let bytes: u64 = list.iter().map(|f| f.bytes).sum();
        f.sample("", &[("table", name)], bytes as f64);
    }
    let mut f = Family::new(
        &mut out,
        "lumen_telemetry_file_rows",
        "gauge",
        "Rows in Parquet files in the manifest, by table.",
    );
    for (name, list) in &files {
        let rows: u64 = list.iter().map(|f| f.rows).sum();
        f.sample("", &[("table", name)], rows as f64);
    }
    Family::new(
        &mut out,
        "lumen_telemetry_files_quarantined",
        "gauge",
        "Files set aside at start because they could not be read.",
    )
    .sample("", &[], store.quarantined.len() as f64);

    let mut f = Family::new(
        &mut out,
        "lumen_telemetry_queries_total",
        "counter",
        "SQL queries answered, by outcome (ok, or the error kind).",
    );
    for (outcome, n) in queries.outcomes() {
        f.sample("", &[("outcome", outcome)], n as f64);
    }
    Family::new(
        &mut out,
        "lumen_telemetry_query_duration_seconds",
        "summary",
        "Time spent answering SQL queries.",
    )
    .sample("_sum", &[], queries.seconds());
    out.push_str("lumen_telemetry_query_duration_seconds_count ");
    let _ = writeln!(
        out,
        "{}",
        queries.outcomes().iter().map(|(_, n)| n).sum::<u64>()
    );
    out
}
