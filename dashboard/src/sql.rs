//! The SQL console: a read-only query over the store (the same engine, limits and refusals
//! as `POST /api/v1/sql`), its result as a table, the tables and their columns beside it, and
//! the result as CSV. The query is in the page's URL, so a result can be shared.

use lumen_telemetry::query::{SqlTable, TableInfo};

/// What the console shows.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlView {
    pub query: String,
    pub result: Option<SqlTable>,
    pub error: Option<String>,
    pub tables: Vec<TableInfo>,
}

/// A starting query for an empty console.
pub const EXAMPLE: &str = "SELECT service_name, span_kind, count(*) AS spans, \
    approx_percentile_cont(duration_ns / 1e6, 0.99) AS p99_ms\n\
    FROM spans\nWHERE start_time > now() - INTERVAL '15 minutes'\n\
    GROUP BY service_name, span_kind\nORDER BY spans DESC";

impl SqlView {
    /// The CSV download's URL for this query.
    pub fn csv_url(&self) -> String {
        format!("/sql.csv?q={}", crate::view::encode(&self.query))
    }
}

/// RFC 4180 CSV: a header of column names, then the rows; fields with a comma, quote or
/// line break are quoted, quotes doubled.
pub fn csv(t: &SqlTable) -> String {
    fn field(out: &mut String, v: &str) {
        if v.contains([',', '"', '\n', '\r']) {
            out.push('"');
            out.push_str(&v.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(v);
        }
    }
    let mut out = String::new();
    for (i, c) in t.columns.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        field(&mut out, c);
    }
    out.push_str("\r\n");
    for row in &t.rows {
        for (i, v) in row.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            field(&mut out, v);
        }
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let t = SqlTable {
            columns: vec!["a".into(), "b,c".into()],
            rows: vec![vec!["x".into(), "say \"hi\"\nthere".into()]],
            truncated: false,
            row_limit: 10,
        };
        assert_eq!(csv(&t), "a,\"b,c\"\r\nx,\"say \"\"hi\"\"\nthere\"\r\n");
    }
}
