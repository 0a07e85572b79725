"""Reads Lumen's stored Parquet files with DuckDB and with pyarrow, independently of Lumen,
and prints what each found as JSON, for the caller to compare with Lumen's own SQL.

Usage: read_parquet.py <data dir>
Reads the file list from each table's manifest.json (the files Lumen serves), not a glob.
"""
import json
import os
import sys

import duckdb
import pyarrow.compute as pc
import pyarrow.parquet as pq


def files(data: str, table: str) -> list:
    with open(os.path.join(data, table, "manifest.json")) as f:
        manifest = json.load(f)
    return [os.path.join(data, table, e["name"]) for e in manifest["files"]]


def main() -> int:
    data = sys.argv[1]
    spans = files(data, "spans")
    out = {}

    con = duckdb.connect()
    con.execute(f"CREATE VIEW spans AS SELECT * FROM read_parquet({spans!r}, union_by_name = true)")
    out["duckdb"] = {
        "rows": con.execute("SELECT count(*) FROM spans").fetchone()[0],
        "traces": con.execute("SELECT count(DISTINCT trace_id) FROM spans").fetchone()[0],
        "errors": con.execute("SELECT count(*) FROM spans WHERE status_code = 'error'").fetchone()[0],
        "by_service": {
            s: n
            for s, n in con.execute(
                "SELECT service_name, count(*) FROM spans GROUP BY 1 ORDER BY 1"
            ).fetchall()
        },
        "duration_sum": con.execute("SELECT sum(duration_ns) FROM spans").fetchone()[0],
        "events": con.execute("SELECT sum(len(events)) FROM spans").fetchone()[0],
        "route_attr": con.execute(
            "SELECT count(*) FROM spans WHERE upstream_cluster IS NOT NULL"
        ).fetchone()[0],
    }

    table = pq.ParquetDataset(spans).read()
    by_service = {}
    for s in table.column("service_name").to_pylist():
        by_service[s] = by_service.get(s, 0) + 1
    out["pyarrow"] = {
        "rows": table.num_rows,
        "traces": len(set(table.column("trace_id").to_pylist())),
        "errors": pc.sum(pc.equal(table.column("status_code"), "error")).as_py() or 0,
        "by_service": dict(sorted(by_service.items())),
        "duration_sum": pc.sum(table.column("duration_ns")).as_py(),
        "events": pc.sum(pc.list_value_length(table.column("events"))).as_py() or 0,
        "schema_versions": sorted(
            {
                (pq.ParquetFile(f).metadata.metadata or {}).get(b"lumen.schema_version", b"?").decode()
                for f in spans
            }
        ),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
