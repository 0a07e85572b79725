//! The telemetry service's own health on `GET /metrics`, in Prometheus' text format or OpenMetrics
//! (`exposition.rs`):
//! what it ingested and refused (by reason), its WAL, flushes and compactions, its files,
//! its buffer and its queries. Every metric name is written here and nowhere else.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::exposition::{Kind, Writer};
use crate::meshmetrics::Dropped;
use crate::query::QueryStats;
use crate::receiver::Receiver;
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
    w: &'a mut Writer,
}

impl<'a> Family<'a> {
    fn new(w: &'a mut Writer, name: &'static str, kind: Kind, help: &str) -> Family<'a> {
        w.family(name, kind, help);
        Family { w }
    }

    fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: f64) {
        self.w.sample_pairs(suffix, labels, value);
    }
}

fn load(c: &AtomicU64) -> f64 {
    c.load(Ordering::Relaxed) as f64
}

/// The service's own families, into `out`.
pub fn render(out: &mut Writer, store: &Store, receiver: &Receiver, queries: &QueryStats) {
    let ingest = &receiver.stats;
    let tables = store.tables();

    let mut f = Family::new(
        out,
        "lumen_telemetry_otlp_requests_accepted_total",
        Kind::Counter,
        "OTLP export requests stored durably and acknowledged.",
    );
    for (i, signal) in SIGNALS.iter().enumerate() {
        f.sample("", &[("signal", signal)], load(&ingest.accepted[i]));
    }
    let mut f = Family::new(
        out,
        "lumen_telemetry_otlp_requests_refused_total",
        Kind::Counter,
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
        out,
        "lumen_telemetry_rows_ingested_total",
        Kind::Counter,
        "Rows stored durably, by table.",
    );
    for t in tables {
        f.sample("", &[("table", t.name)], load(&t.stats.rows_ingested));
    }

    let wal = store.wal_stats();
    Family::new(
        out,
        "lumen_telemetry_wal_records_total",
        Kind::Counter,
        "Records appended to the write-ahead log.",
    )
    .sample("", &[], load(&wal.records));
    Family::new(
        out,
        "lumen_telemetry_wal_written_bytes_total",
        Kind::Counter,
        "Bytes appended to the write-ahead log.",
    )
    .sample("", &[], load(&wal.bytes));
    Family::new(
        out,
        "lumen_telemetry_wal_fsyncs_total",
        Kind::Counter,
        "fsyncs of the write-ahead log (one per group commit).",
    )
    .sample("", &[], load(&wal.fsyncs));
    Family::new(
        out,
        "lumen_telemetry_wal_disk_bytes",
        Kind::Gauge,
        "Bytes of write-ahead log segments on disk.",
    )
    .sample("", &[], store.wal_disk_bytes() as f64);

    let budget = store.budget();
    Family::new(
        out,
        "lumen_telemetry_buffered_bytes",
        Kind::Gauge,
        "Bytes of rows held in memory (memtables and requests being converted).",
    )
    .sample("", &[], budget.used() as f64);
    Family::new(
        out,
        "lumen_telemetry_buffered_bytes_limit",
        Kind::Gauge,
        "The cap on buffered bytes (--max-buffered-mib).",
    )
    .sample("", &[], budget.cap() as f64);
    let mut f = Family::new(
        out,
        "lumen_telemetry_buffered_rows",
        Kind::Gauge,
        "Rows in the memtable, not yet in Parquet, by table.",
    );
    for t in tables {
        f.sample("", &[("table", t.name)], t.buffered_rows() as f64);
    }

    let mut f = Family::new(
        out,
        "lumen_telemetry_flush_duration_seconds",
        Kind::Summary,
        "Time spent flushing memtables to Parquet, by table.",
    );
    for t in tables {
        let labels = [("table", t.name)];
        f.sample("_sum", &labels, load(&t.stats.flush_micros) / 1e6);
        f.sample("_count", &labels, load(&t.stats.flushes));
    }
    let mut f = Family::new(
        out,
        "lumen_telemetry_flush_failures_total",
        Kind::Counter,
        "Flushes that failed (their rows stay in the WAL and memtable), by table.",
    );
    for t in tables {
        f.sample("", &[("table", t.name)], load(&t.stats.flush_failures));
    }
    let mut f = Family::new(
        out,
        "lumen_telemetry_compaction_duration_seconds",
        Kind::Summary,
        "Time spent merging files, by table.",
    );
    for t in tables {
        let labels = [("table", t.name)];
        f.sample("_sum", &labels, load(&t.stats.compaction_micros) / 1e6);
        f.sample("_count", &labels, load(&t.stats.compactions));
    }
    let mut f = Family::new(
        out,
        "lumen_telemetry_files_expired_total",
        Kind::Counter,
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
        let mut f = Family::new(out, name, Kind::Counter, help);
        for t in tables {
            f.sample("", &[("table", t.name)], counter(t));
        }
    }
    let files: Vec<_> = tables.iter().map(|t| (t.name, t.files())).collect();
    let mut f = Family::new(
        out,
        "lumen_telemetry_files",
        Kind::Gauge,
        "Parquet files in the manifest, by table.",
    );
    for (name, list) in &files {
        f.sample("", &[("table", name)], list.len() as f64);
    }
    let mut f = Family::new(
        out,
        "lumen_telemetry_file_bytes",
        Kind::Gauge,
        "Bytes of Parquet files in the manifest, by table.",
    );
    for (name, list) in &files {
        let bytes: u64 = list.iter().map(|f| f.bytes).sum();
        f.sample("", &[("table", name)], bytes as f64);
    }
    let mut f = Family::new(
        out,
        "lumen_telemetry_file_rows",
        Kind::Gauge,
        "Rows in Parquet files in the manifest, by table.",
    );
    for (name, list) in &files {
        let rows: u64 = list.iter().map(|f| f.rows).sum();
        f.sample("", &[("table", name)], rows as f64);
    }
    Family::new(
        out,
        "lumen_telemetry_files_quarantined",
        Kind::Gauge,
        "Files set aside at start because they could not be read.",
    )
    .sample("", &[], store.quarantined.len() as f64);

    let mut f = Family::new(
        out,
        "lumen_telemetry_queries_total",
        Kind::Counter,
        "SQL queries answered, by outcome (ok, or the error kind).",
    );
    for (outcome, n) in queries.outcomes() {
        f.sample("", &[("outcome", outcome)], n as f64);
    }
    Family::new(
        out,
        "lumen_telemetry_mesh_series",
        Kind::Gauge,
        "Series of the mesh's metric families held for /metrics (at most --max-metric-series).",
    )
    .sample("", &[], receiver.mesh.series() as f64);
    let mut f = Family::new(
        out,
        "lumen_telemetry_mesh_points_dropped_total",
        Kind::Counter,
        "Data points of the mesh's metric families not aggregated, by reason (series_cap: a new series past --max-metric-series).",
    );
    for why in Dropped::ALL {
        f.sample(
            "",
            &[("reason", why.label())],
            receiver.mesh.dropped(why) as f64,
        );
    }

    let mut f = Family::new(
        out,
        "lumen_telemetry_query_duration_seconds",
        Kind::Summary,
        "Time spent answering SQL queries.",
    );
    f.sample("_sum", &[], queries.seconds());
    f.sample(
        "_count",
        &[],
        queries.outcomes().iter().map(|(_, n)| n).sum::<u64>() as f64,
    );
}
