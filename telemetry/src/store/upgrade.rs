//! Rewrites rows of an older layout into the current one (see `schema::SCHEMA_VERSION`).
//! Columns are matched by name, recursively through lists and structs: a column the old
//! layout lacks becomes nulls (or empty maps, for the non-null attribute maps), hex text ids
//! become binary, anything else Arrow can cast is cast. Version 2's attribute maps held
//! every attribute as text, promoted ones included; they stay so (the types were lost when
//! those files were written, and nothing is dropped).

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeBinaryBuilder, ListArray, MapArray, StringBuilder,
    StructArray, new_empty_array, new_null_array,
};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, FieldRef, Fields, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;

/// Attributes that later layouts promoted to a column, per table: (attribute key, column).
/// Rows of an older layout have them in their `attributes` map.
pub fn promoted(table: &str) -> &'static [(&'static str, &'static str)] {
    match table {
        "spans" => &crate::convert::SPAN_MESH_COLUMNS,
        _ => &[],
    }
}

/// `batch` (of any earlier layout) as a batch of `schema`; a `promoted` column the old rows
/// lack is taken from their `attributes` map.
pub fn conform_batch(
    batch: &RecordBatch,
    schema: &SchemaRef,
    promoted: &[(&str, &str)],
) -> Result<RecordBatch, ArrowError> {
    let rows = batch.num_rows();
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(col) => conform(col, field),
            None => match promoted.iter().find(|(_, column)| column == field.name()) {
                Some((key, _)) => from_map(batch, key),
                None => absent(field, rows),
            },
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns)
}

/// The text value of `key` in each row's `attributes` map (null where it has none).
fn from_map(batch: &RecordBatch, key: &str) -> Result<ArrayRef, ArrowError> {
    let rows = batch.num_rows();
    let Some(map) = batch
        .column_by_name("attributes")
        .and_then(|c| c.as_map_opt())
    else {
        return Ok(new_null_array(&DataType::Utf8, rows));
    };
    let keys = map.keys().as_string_opt::<i32>();
    let values = map.values().as_string_opt::<i32>();
    let (Some(keys), Some(values)) = (keys, values) else {
        return Ok(new_null_array(&DataType::Utf8, rows));
    };
    let offsets = map.value_offsets();
    let mut out = StringBuilder::with_capacity(rows, rows.saturating_mul(8));
    for row in 0..rows {
        let (lo, hi) = (offsets[row] as usize, offsets[row + 1] as usize);
        let found = (lo..hi).find(|&i| keys.value(i) == key);
        out.append_option(
            found
                .filter(|&i| values.is_valid(i))
                .map(|i| values.value(i)),
        );
    }
    Ok(Arc::new(out.finish()))
}

/// A column the old rows do not have: nulls, or empty maps and lists where nulls are not
/// allowed.
fn absent(field: &FieldRef, rows: usize) -> Result<ArrayRef, ArrowError> {
    if field.is_nullable() {
        return Ok(new_null_array(field.data_type(), rows));
    }
    match field.data_type() {
        DataType::Map(entries, sorted) => {
            let DataType::Struct(fields) = entries.data_type() else {
                return Err(ArrowError::SchemaError(format!(
                    "map {} without struct entries",
                    field.name()
                )));
            };
            let entries_array = StructArray::try_new(
                fields.clone(),
                fields
                    .iter()
                    .map(|f| new_empty_array(f.data_type()))
                    .collect(),
                None,
            )?;
            Ok(Arc::new(MapArray::try_new(
                entries.clone(),
                OffsetBuffer::new_zeroed(rows),
                entries_array,
                None,
                *sorted,
            )?))
        }
        other => Err(ArrowError::SchemaError(format!(
            "column {} ({other}) is required and missing from the old layout",
            field.name()
        ))),
    }
}

/// One column converted to `field`'s type.
fn conform(col: &ArrayRef, field: &FieldRef) -> Result<ArrayRef, ArrowError> {
    let target = field.data_type();
    if col.data_type() == target {
        return Ok(col.clone());
    }
    match (col.data_type(), target) {
        (DataType::Utf8, DataType::FixedSizeBinary(width)) => unhex(col, *width, field.name()),
        (DataType::List(_), DataType::List(item)) => {
            let list = col.as_list::<i32>();
            let values = conform(list.values(), item)?;
            Ok(Arc::new(ListArray::try_new(
                item.clone(),
                list.offsets().clone(),
                values,
                list.nulls().cloned(),
            )?))
        }
        (DataType::Struct(_), DataType::Struct(fields)) => {
            let st = col.as_struct();
            Ok(Arc::new(conform_struct(st, fields)?))
        }
        _ => cast(col, target),
    }
}

fn conform_struct(st: &StructArray, fields: &Fields) -> Result<StructArray, ArrowError> {
    let columns = fields
        .iter()
        .map(|f| match st.column_by_name(f.name()) {
            Some(c) => conform(c, f),
            None => absent(f, st.len()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    StructArray::try_new(fields.clone(), columns, st.nulls().cloned())
}

/// Hex text ids (layouts 1 and 2) as bytes.
fn unhex(col: &ArrayRef, width: i32, name: &str) -> Result<ArrayRef, ArrowError> {
    let text = col.as_string::<i32>();
    let mut out = FixedSizeBinaryBuilder::with_capacity(text.len(), width);
    let mut buf = vec![0u8; usize::try_from(width).unwrap_or(0)];
    for v in text.iter() {
        match v {
            None => out.append_null(),
            Some(hex) => {
                decode_hex(hex, &mut buf).map_err(|e| {
                    ArrowError::InvalidArgumentError(format!("{name}: {e}: {hex:?}"))
                })?;
                out.append_value(&buf)?;
            }
        }
    }
    Ok(Arc::new(out.finish()))
}

/// Decodes `hex` into `out`, which it must fill exactly.
pub fn decode_hex(hex: &str, out: &mut [u8]) -> Result<(), &'static str> {
    if hex.len() != out.len() * 2 {
        return Err("not an id of the expected length");
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err("not hexadecimal"),
    };
    for (o, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        *o = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema;
    use datafusion::arrow::array::{MapBuilder, StringArray, StringBuilder};
    use datafusion::arrow::datatypes::{Field, Schema};

    #[test]
    fn hex_ids_become_bytes_and_missing_maps_empty() {
        let mut attrs = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        attrs.keys().append_value("http.response.status_code");
        attrs.values().append_value("200");
        attrs.append(true).expect("row");
        let old = Arc::new(Schema::new(vec![
            Field::new("trace_id", DataType::Utf8, false),
            Field::new("attributes", schema::string_map(), false),
        ]));
        let batch = RecordBatch::try_new(
            old,
            vec![
                Arc::new(StringArray::from(vec!["0102030405060708090a0b0c0d0e0f10"])),
                Arc::new(attrs.finish()),
            ],
        )
        .expect("batch");
        let target = Arc::new(Schema::new(vec![
            Field::new("trace_id", schema::trace_id_type(), false),
            Field::new("attributes", schema::string_map(), false),
            Field::new("attributes_int", schema::typed_map(DataType::Int64), false),
            Field::new("parent_span_id", schema::span_id_type(), true),
        ]));
        let out = conform_batch(&batch, &target, &[]).expect("conforms");
        let ids = out.column(0).as_fixed_size_binary();
        assert_eq!(ids.value(0), (1u8..=16).collect::<Vec<_>>().as_slice());
        assert_eq!(out.column(1).as_map().value_length(0), 1);
        assert_eq!(out.column(2).as_map().value_length(0), 0);
        assert!(out.column(3).is_null(0));
    }

    #[test]
    fn promoted_attributes_move_from_the_old_map_to_their_column() {
        let mut attrs = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        attrs.keys().append_value("guid:x-request-id");
        attrs.values().append_value("r-1");
        attrs.append(true).expect("row");
        attrs.append(true).expect("row");
        let old = Arc::new(Schema::new(vec![Field::new(
            "attributes",
            schema::string_map(),
            false,
        )]));
        let batch = RecordBatch::try_new(old, vec![Arc::new(attrs.finish())]).expect("batch");
        let target = Arc::new(Schema::new(vec![Field::new(
            "request_id",
            DataType::Utf8,
            true,
        )]));
        let out = conform_batch(&batch, &target, promoted("spans")).expect("conforms");
        let ids = out.column(0).as_string::<i32>();
        assert_eq!(ids.value(0), "r-1");
        assert!(ids.is_null(1));
    }

    #[test]
    fn bad_hex_is_an_error_naming_the_column() {
        let mut out = [0u8; 2];
        assert!(decode_hex("zz00", &mut out).is_err());
        assert!(decode_hex("00", &mut out).is_err());
        decode_hex("aB0f", &mut out).expect("hex");
        assert_eq!(out, [0xab, 0x0f]);
    }
}
