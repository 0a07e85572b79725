"""Times SQL over Lumen's Parquet files with DuckDB, the baseline of the telemetry benchmark.

Usage: duckdb_query.py <data dir> <runs> <sql> [<sql> ...]
Each statement sees the files of <data dir>/spans and <data dir>/rollups as views named
`spans` and `rollups`. Prints one line per statement:
`<p50 ms> <p99 ms> <rows>`. DuckDB gets two threads, as Lumen's query runtime has.
"""
import statistics
import sys
import time

import duckdb


def main() -> int:
    data_dir, runs, statements = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    for table in ("spans", "rollups"):
        con.execute(
            f"CREATE VIEW {table} AS SELECT * FROM "
            f"read_parquet('{data_dir}/{table}/*.parquet', union_by_name = true)"
        )
    for sql in statements:
        times = []
        rows = 0
        for _ in range(runs):
            started = time.perf_counter()
            rows = len(con.execute(sql).fetchall())
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        print(f"{statistics.median(times):.3f} {p99:.3f} {rows}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
