//! Layered layout of a service graph: callers left, callees right, one column per depth.

use std::collections::{BTreeMap, BTreeSet};

/// Node positions and the canvas size.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub positions: BTreeMap<String, (i32, i32)>,
    pub width: u32,
    pub height: u32,
}

const COLUMN: i32 = 260;
const ROW: i32 = 110;
const MARGIN: i32 = 70;

/// Places each node in the column of its longest path from a root (cycles are cut by a
/// depth limit), and spreads each column vertically.
pub fn layered(nodes: &[String], edges: &[(String, String)]) -> Layout {
    let mut depth: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.as_str(), 0)).collect();
    let limit = nodes.len();
    for _ in 0..limit {
        let mut changed = false;
        for (s, d) in edges {
            if s == d {
                continue;
            }
            let next = depth.get(s.as_str()).copied().unwrap_or(0) + 1;
            if next <= limit && depth.get(d.as_str()).copied().unwrap_or(0) < next {
                depth.insert(d.as_str(), next);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut columns: BTreeMap<usize, BTreeSet<&str>> = BTreeMap::new();
    for (n, d) in &depth {
        columns.entry(*d).or_default().insert(n);
    }
    let rows = columns
        .values()
        .map(BTreeSet::len)
        .max()
        .unwrap_or(1)
        .max(1);
    let height = MARGIN * 2 + ROW * (rows as i32 - 1);
    let mut positions = BTreeMap::new();
    for (col, names) in &columns {
        let span = ROW * (names.len() as i32 - 1);
        let top = (height - span) / 2;
        for (i, name) in names.iter().enumerate() {
            positions.insert(
                (*name).to_string(),
                (MARGIN + COLUMN * *col as i32, top + ROW * i as i32),
            );
        }
    }
    let width = MARGIN * 2 + COLUMN * (columns.len().max(1) as i32 - 1);
    Layout {
        positions,
        width: width.max(200) as u32,
        height: height.max(140) as u32,
    }
}

/// The segment between two circle centres, shortened by `r` at both ends.
pub fn shorten(x1: i32, y1: i32, x2: i32, y2: i32, r: f64) -> (i32, i32, i32, i32) {
    let (dx, dy) = (f64::from(x2 - x1), f64::from(y2 - y1));
    let len = (dx * dx + dy * dy).sqrt();
    if len <= 2.0 * r {
        return (x1, y1, x2, y2);
    }
    let (ux, uy) = (dx / len * r, dy / len * r);
    (
        (f64::from(x1) + ux).round() as i32,
        (f64::from(y1) + uy).round() as i32,
        (f64::from(x2) - ux).round() as i32,
        (f64::from(y2) - uy).round() as i32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_left_of_callees() {
        let nodes: Vec<String> = ["details", "productpage", "ratings", "reviews"]
            .map(String::from)
            .to_vec();
        let edges = vec![
            ("productpage".to_string(), "reviews".to_string()),
            ("productpage".to_string(), "details".to_string()),
            ("reviews".to_string(), "ratings".to_string()),
        ];
        let l = layered(&nodes, &edges);
        let x = |n: &str| l.positions[n].0;
        assert!(x("productpage") < x("reviews") && x("reviews") < x("ratings"));
        assert_eq!(x("details"), x("reviews"));
    }

    #[test]
    fn cycles_terminate() {
        let nodes: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let edges = vec![
            ("a".to_string(), "b".to_string()),
            ("b".to_string(), "a".to_string()),
        ];
        let l = layered(&nodes, &edges);
        assert_eq!(l.positions.len(), 2);
    }
}
