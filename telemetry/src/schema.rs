//! Arrow schemas of the stored tables. These are a format contract: every file records the
//! layout version it was written with, and files of an older version are rewritten into the
//! current layout when the store opens (`store::upgrade`), so queries only ever see one
//! layout. Column names follow OpenTelemetry semantic conventions with `.` written as `_`.

use std::sync::{Arc, LazyLock};

use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

/// Version of the table layouts, stored in each Parquet file's metadata.
/// 2: spans gained flags, dropped counts, events and links (appended, nullable).
/// 3: trace and span ids are binary (spans, links, logs); span and log attributes are
///    typed (`attributes` keeps strings, `attributes_int` / `_double` / `_bool` the rest);
///    attributes promoted to a column are no longer repeated in the map, and the mesh
///    proxy's own attributes (`convert::SPAN_MESH_COLUMNS`) are promoted; rows are sorted
///    by time within a file.
/// 4: bytes attributes keep their type (`attributes_bytes`, spans and logs).
/// 5: rollups carry the service's and the caller's namespace (appended, nullable).
pub const SCHEMA_VERSION: &str = "5";

/// Layout versions this build reads; files of any other version are quarantined. Files of
/// an older version are rewritten into the current layout at open (`store::upgrade`).
pub const READABLE_VERSIONS: &[&str] = &["1", "2", "3", "4", "5"];

/// A trace id: 16 bytes. SQL shows it as hex, and a hex string literal compared with it is
/// read as the id's bytes (`query::hex_ids`).
pub fn trace_id_type() -> DataType {
    DataType::FixedSizeBinary(16)
}

/// A span id: 8 bytes.
pub fn span_id_type() -> DataType {
    DataType::FixedSizeBinary(8)
}

/// The `spans` table: one row per span.
pub static SPANS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("trace_id", trace_id_type(), false),
        Field::new("span_id", span_id_type(), false),
        Field::new("parent_span_id", span_id_type(), true),
        Field::new("trace_state", DataType::Utf8, true),
        Field::new("service_name", DataType::Utf8, false),
        Field::new("service_version", DataType::Utf8, true),
        Field::new("service_namespace", DataType::Utf8, true),
        Field::new("span_name", DataType::Utf8, false),
        Field::new("span_kind", DataType::Utf8, false),
        Field::new("start_time", timestamp(), false),
        Field::new("end_time", timestamp(), false),
        Field::new("duration_ns", DataType::Int64, false),
        Field::new("status_code", DataType::Utf8, false),
        Field::new("status_message", DataType::Utf8, true),
        Field::new("http_request_method", DataType::Utf8, true),
        Field::new("http_response_status_code", DataType::Int64, true),
        Field::new("http_route", DataType::Utf8, true),
        Field::new("url_path", DataType::Utf8, true),
        Field::new("url_full", DataType::Utf8, true),
        Field::new("server_address", DataType::Utf8, true),
        Field::new("server_port", DataType::Int64, true),
        Field::new("network_peer_address", DataType::Utf8, true),
        Field::new("rpc_system", DataType::Utf8, true),
        Field::new("rpc_service", DataType::Utf8, true),
        Field::new("rpc_method", DataType::Utf8, true),
        Field::new("rpc_grpc_status_code", DataType::Int64, true),
        // Version 3: what a mesh proxy (Istio's Envoy, lumen-proxy) puts on every span.
        Field::new("peer_service", DataType::Utf8, true),
        Field::new("request_id", DataType::Utf8, true),
        Field::new("upstream_cluster", DataType::Utf8, true),
        Field::new("response_flags", DataType::Utf8, true),
        Field::new("user_agent_original", DataType::Utf8, true),
        Field::new("error_type", DataType::Utf8, true),
        Field::new("istio_canonical_service", DataType::Utf8, true),
        Field::new("istio_canonical_revision", DataType::Utf8, true),
        Field::new("istio_namespace", DataType::Utf8, true),
        Field::new("scope_name", DataType::Utf8, true),
        Field::new("scope_version", DataType::Utf8, true),
        // String attributes not promoted to a column above; arrays and maps as JSON.
        Field::new("attributes", string_map(), false),
        Field::new("resource_attributes", string_map(), false),
        // Version 2.
        Field::new("flags", DataType::Int64, true),
        Field::new("dropped_attributes_count", DataType::Int64, true),
        Field::new("dropped_events_count", DataType::Int64, true),
        Field::new("dropped_links_count", DataType::Int64, true),
        Field::new("events", list_of(EVENT_FIELDS.clone()), true),
        Field::new("links", list_of(LINK_FIELDS.clone()), true),
        // Version 3.
        Field::new("attributes_int", typed_map(DataType::Int64), false),
        Field::new("attributes_double", typed_map(DataType::Float64), false),
        Field::new("attributes_bool", typed_map(DataType::Boolean), false),
        // Version 4.
        Field::new("attributes_bytes", typed_map(DataType::Binary), false),
    ]))
});

/// One span event: `events[i]['name']` in SQL.
pub static EVENT_FIELDS: LazyLock<Fields> = LazyLock::new(|| {
    Fields::from(vec![
        Field::new("time", timestamp(), false),
        Field::new("name", DataType::Utf8, false),
        Field::new("attributes", string_map(), false),
        Field::new("dropped_attributes_count", DataType::Int64, false),
    ])
});

/// One span link: the linked span's ids (hex) and the link's attributes.
pub static LINK_FIELDS: LazyLock<Fields> = LazyLock::new(|| {
    Fields::from(vec![
        Field::new("trace_id", trace_id_type(), false),
        Field::new("span_id", span_id_type(), false),
        Field::new("trace_state", DataType::Utf8, true),
        Field::new("attributes", string_map(), false),
        Field::new("dropped_attributes_count", DataType::Int64, false),
        Field::new("flags", DataType::Int64, false),
    ])
});

/// `List<Struct<fields>>` with non-null items.
pub fn list_of(fields: Fields) -> DataType {
    DataType::List(Arc::new(Field::new(
        "item",
        DataType::Struct(fields),
        false,
    )))
}

/// The `metrics` table: one row per data point.
pub static METRICS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("time", timestamp(), false),
        Field::new("start_time", timestamp(), true),
        Field::new("service_name", DataType::Utf8, false),
        Field::new("metric_name", DataType::Utf8, false),
        Field::new("metric_type", DataType::Utf8, false),
        Field::new("unit", DataType::Utf8, true),
        Field::new("temporality", DataType::Utf8, true),
        Field::new("is_monotonic", DataType::Boolean, true),
        Field::new("value", DataType::Float64, true),
        Field::new("count", DataType::Int64, true),
        Field::new("sum", DataType::Float64, true),
        Field::new(
            "bucket_counts",
            DataType::List(Arc::new(Field::new("item", DataType::Int64, true))),
            true,
        ),
        Field::new(
            "explicit_bounds",
            DataType::List(Arc::new(Field::new("item", DataType::Float64, true))),
            true,
        ),
        Field::new("attributes", string_map(), false),
        Field::new("resource_attributes", string_map(), false),
        Field::new("scope_name", DataType::Utf8, true),
    ]))
});

/// The `logs` table: one row per log record.
pub static LOGS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("time", timestamp(), false),
        Field::new("observed_time", timestamp(), true),
        Field::new("service_name", DataType::Utf8, false),
        Field::new("severity_number", DataType::Int32, false),
        Field::new("severity_text", DataType::Utf8, true),
        Field::new("body", DataType::Utf8, true),
        Field::new("event_name", DataType::Utf8, true),
        Field::new("trace_id", trace_id_type(), true),
        Field::new("span_id", span_id_type(), true),
        Field::new("flags", DataType::Int64, false),
        Field::new("dropped_attributes_count", DataType::Int64, false),
        Field::new("attributes", string_map(), false),
        Field::new("resource_attributes", string_map(), false),
        Field::new("scope_name", DataType::Utf8, true),
        Field::new("scope_version", DataType::Utf8, true),
        // Version 3.
        Field::new("attributes_int", typed_map(DataType::Int64), false),
        Field::new("attributes_double", typed_map(DataType::Float64), false),
        Field::new("attributes_bool", typed_map(DataType::Boolean), false),
        // Version 4.
        Field::new("attributes_bytes", typed_map(DataType::Binary), false),
    ]))
});

/// UTC timestamps with nanosecond precision, as OTLP carries them.
pub fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// `Map<Utf8, Utf8>` in the layout Arrow's `MapBuilder` produces.
pub fn string_map() -> DataType {
    typed_map(DataType::Utf8)
}

/// `Map<Utf8, value>` in the layout Arrow's `MapBuilder` produces.
pub fn typed_map(value: DataType) -> DataType {
    let entries = Field::new(
        "entries",
        DataType::Struct(Fields::from(vec![
            Field::new("keys", DataType::Utf8, false),
            Field::new("values", value, true),
        ])),
        false,
    );
    DataType::Map(Arc::new(entries), false)
}
