//! Trace and span ids are stored as bytes, but everyone writes them as hex: Jaeger UI, W3C
//! `traceparent`, every log line. This analyzer rule lets SQL say `trace_id = '4bf9…'` (or
//! `IN ('…', '…')`): a text literal compared with an id column is read as hex, and a literal
//! that is not an id of that width is the caller's error, named, instead of a comparison
//! that silently matches nothing. Results show ids as hex (Arrow's JSON writer does).

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, DataFusionError, Result, ScalarValue};
use datafusion::config::ConfigOptions;
use datafusion::logical_expr::expr::InList;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::utils::merge_schema;
use datafusion::logical_expr::{BinaryExpr, Expr, ExprSchemable, LogicalPlan, Operator};
use datafusion::optimizer::AnalyzerRule;

/// Runs before type coercion, which would otherwise compare the id's bytes with the text's.
#[derive(Debug, Default)]
pub struct HexIds;

impl AnalyzerRule for HexIds {
    fn name(&self) -> &str {
        "lumen_hex_ids"
    }

    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(rewrite_plan)
            .map(|t| t.data)
    }
}

fn rewrite_plan(plan: LogicalPlan) -> Result<Transformed<LogicalPlan>> {
    let schema = merge_schema(&plan.inputs());
    let names = NamePreserver::new(&plan);
    plan.map_expressions(|expr| {
        let name = names.save(&expr);
        let rewritten = expr.transform_up(|e| rewrite_expr(e, &schema))?;
        Ok(rewritten.update_data(|e| name.restore(e)))
    })
}

/// The id width of `e` if it is an id column (FixedSizeBinary).
fn id_width(e: &Expr, schema: &DFSchema) -> Option<i32> {
    match e {
        Expr::Column(_) => match e.get_type(schema).ok()? {
            datafusion::arrow::datatypes::DataType::FixedSizeBinary(w) => Some(w),
            _ => None,
        },
        _ => None,
    }
}

fn text(e: &Expr) -> Option<&str> {
    match e {
        Expr::Literal(
            ScalarValue::Utf8(Some(s))
            | ScalarValue::LargeUtf8(Some(s))
            | ScalarValue::Utf8View(Some(s)),
            _,
        ) => Some(s),
        _ => None,
    }
}

/// `s` as an id literal of `width` bytes, or the caller's error.
fn id_literal(column: &Expr, s: &str, width: i32) -> Result<Expr> {
    let mut bytes = vec![0u8; usize::try_from(width).unwrap_or(0)];
    crate::store::decode_hex(s, &mut bytes).map_err(|why| {
        DataFusionError::Plan(format!(
            "{column} holds {width}-byte ids, written as {} hex digits; '{s}' is {why}",
            width * 2
        ))
    })?;
    Ok(Expr::Literal(
        ScalarValue::FixedSizeBinary(width, Some(bytes)),
        None,
    ))
}

fn rewrite_expr(e: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) if comparison(op) => {
            if let (Some(w), Some(s)) = (id_width(&left, schema), text(&right)) {
                let right = Box::new(id_literal(&left, s, w)?);
                return Ok(Transformed::yes(Expr::BinaryExpr(BinaryExpr {
                    left,
                    op,
                    right,
                })));
            }
            if let (Some(s), Some(w)) = (text(&left), id_width(&right, schema)) {
                let left = Box::new(id_literal(&right, s, w)?);
                return Ok(Transformed::yes(Expr::BinaryExpr(BinaryExpr {
                    left,
                    op,
                    right,
                })));
            }
            Ok(Transformed::no(Expr::BinaryExpr(BinaryExpr {
                left,
                op,
                right,
            })))
        }
        Expr::InList(InList {
            expr,
            list,
            negated,
        }) => match id_width(&expr, schema) {
            Some(w) if list.iter().any(|item| text(item).is_some()) => {
                let list = list
                    .into_iter()
                    .map(|item| match text(&item) {
                        Some(s) => id_literal(&expr, s, w),
                        None => Ok(item),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Transformed::yes(Expr::InList(InList {
                    expr,
                    list,
                    negated,
                })))
            }
            _ => Ok(Transformed::no(Expr::InList(InList {
                expr,
                list,
                negated,
            }))),
        },
        other => Ok(Transformed::no(other)),
    }
}

/// Whether `op` compares (the rewrite applies to `=`, `<>`, `<`, ... alike).
fn comparison(op: Operator) -> bool {
    matches!(
        op,
        Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::IsDistinctFrom
            | Operator::IsNotDistinctFrom
    )
}
