//! Arrow schemas of the stored tables. These are a format contract: Parquet files written
//! with one version are read by the next, so columns are only ever added at the end.
//! Column names follow OpenTelemetry semantic conventions with `.` written as `_`.

use std::sync::{Arc, LazyLock};

use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

/// Version of the table layouts, stored in each Parquet file's metadata.
/// 2: spans gained flags, dropped counts, events and links (appended, nullable).
pub const SCHEMA_VERSION: &str = "2";

/// Layout versions this build reads; files of any other version are quarantined. Files of
/// an older version are read with the columns they lack as nulls.
pub const READABLE_VERSIONS: &[&str] = &["1", "2"];

/// The `spans` table: one row per span.
pub static SPANS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("trace_id", DataType::Utf8, false),
        Field::new("span_id", DataType::Utf8, false),
        Field::new("parent_span_id", DataType::Utf8, true),
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
        Field::new("scope_name", DataType::Utf8, true),
        Field::new("scope_version", DataType::Utf8, true),
        Field::new("attributes", string_map(), false),
        Field::new("resource_attributes", string_map(), false),
        // Version 2.
        Field::new("flags", DataType::Int64, true),
        Field::new("dropped_attributes_count", DataType::Int64, true),
        Field::new("dropped_events_count", DataType::Int64, true),
        Field::new("dropped_links_count", DataType::Int64, true),
        Field::new("events", list_of(EVENT_FIELDS.clone()), true),
        Field::new("links", list_of(LINK_FIELDS.clone()), true),
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
        Field::new("trace_id", DataType::Utf8, false),
        Field::new("span_id", DataType::Utf8, false),
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
        Field::new("trace_id", DataType::Utf8, true),
        Field::new("span_id", DataType::Utf8, true),
        Field::new("flags", DataType::Int64, false),
        Field::new("dropped_attributes_count", DataType::Int64, false),
        Field::new("attributes", string_map(), false),
        Field::new("resource_attributes", string_map(), false),
        Field::new("scope_name", DataType::Utf8, true),
        Field::new("scope_version", DataType::Utf8, true),
    ]))
});

/// UTC timestamps with nanosecond precision, as OTLP carries them.
pub fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// `Map<Utf8, Utf8>` in the layout Arrow's `MapBuilder` produces.
pub fn string_map() -> DataType {
    let entries = Field::new(
        "entries",
        DataType::Struct(Fields::from(vec![
            Field::new("keys", DataType::Utf8, false),
            Field::new("values", DataType::Utf8, true),
        ])),
        false,
    );
    DataType::Map(Arc::new(entries), false)
}
