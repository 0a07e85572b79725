//! Layout of a service graph, drawn server-side: nodes in layers (callers left, callees
//! right, one column per call depth, names sorted within a column so the picture stays put
//! between refreshes), nodes sized to their names, and edge labels placed so that no label
//! overlaps a node or another label.

use std::collections::{BTreeMap, BTreeSet};

/// A box on the canvas: top-left corner and size, in px.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

impl Rect {
    pub fn centered(cx: f64, cy: f64, w: f64, h: f64) -> Rect {
        Rect {
            x: cx - w / 2.0,
            y: cy - h / 2.0,
            w,
            h,
        }
    }

    pub fn cx(&self) -> f64 {
        self.x + self.w / 2.0
    }

    pub fn cy(&self) -> f64 {
        self.y + self.h / 2.0
    }

    /// Whether the boxes, each grown by `pad`, share any area.
    pub fn overlaps(&self, o: &Rect, pad: f64) -> bool {
        self.x - pad < o.x + o.w + pad
            && o.x - pad < self.x + self.w + pad
            && self.y - pad < o.y + o.h + pad
            && o.y - pad < self.y + self.h + pad
    }

    fn shifted(&self, dx: f64, dy: f64) -> Rect {
        Rect {
            x: self.x + dx,
            y: self.y + dy,
            ..*self
        }
    }
}

/// Width of `text` at the dashboard's 12 px system font, generously (wider glyphs too).
pub fn text_width(text: &str, px_per_char: f64) -> f64 {
    text.chars().count() as f64 * px_per_char
}

/// A node to place: its id, its layer key (nodes sharing a key, e.g. one app's versions,
/// stay together in one column) and its size.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: String,
    pub group: String,
    pub w: f64,
    pub h: f64,
}

/// Boxes drawn around the nodes of each group (an app around its versions): the width of
/// the group's title, or `None` for no boxes.
pub type GroupBoxes = Option<BTreeMap<String, f64>>;

/// Everything placed, and the canvas size.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub nodes: BTreeMap<String, Rect>,
    /// Each group's box (when boxes were asked for), its title in its top 18 px.
    pub groups: BTreeMap<String, Rect>,
    /// One label box per edge, in the order the edges were given.
    pub labels: Vec<Rect>,
    pub width: f64,
    pub height: f64,
}

/// Room between columns: at least this, more when labels are wider.
const COLUMN_GAP: f64 = 230.0;
/// A group box's title strip above its first node, and its padding.
const GROUP_TITLE: f64 = 18.0;
const GROUP_PAD: f64 = 6.0;
const ROW_GAP: f64 = 56.0;
const MARGIN: f64 = 24.0;

/// Columns by longest call path from a root over the groups (cycles cut by a depth limit).
fn depths(groups: &BTreeSet<&str>, edges: &[(&str, &str)]) -> BTreeMap<String, usize> {
    let mut depth: BTreeMap<String, usize> = groups.iter().map(|g| (g.to_string(), 0)).collect();
    let limit = groups.len();
    for _ in 0..limit {
        let mut changed = false;
        for (s, d) in edges {
            if s == d {
                continue;
            }
            let next = depth.get(*s).copied().unwrap_or(0) + 1;
            if next <= limit && depth.get(*d).copied().unwrap_or(0) < next {
                depth.insert((*d).to_string(), next);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    depth
}

/// Places `nodes` (edges given by node id) and one label of the given size per edge.
pub fn layout(
    nodes: &[NodeSpec],
    edges: &[(String, String)],
    labels: &[(f64, f64)],
    group_boxes: &GroupBoxes,
) -> Layout {
    let group_of: BTreeMap<&str, &str> = nodes
        .iter()
        .map(|n| (n.id.as_str(), n.group.as_str()))
        .collect();
    let groups: BTreeSet<&str> = nodes.iter().map(|n| n.group.as_str()).collect();
    let group_edges: Vec<(&str, &str)> = edges
        .iter()
        .filter_map(|(s, d)| Some((*group_of.get(s.as_str())?, *group_of.get(d.as_str())?)))
        .filter(|(s, d)| s != d)
        .collect();
    let depth = depths(&groups, &group_edges);
    // Column → its nodes, in group then id order.
    let mut columns: BTreeMap<usize, Vec<&NodeSpec>> = BTreeMap::new();
    let mut sorted: Vec<&NodeSpec> = nodes.iter().collect();
    sorted.sort_by(|a, b| (&a.group, &a.id).cmp(&(&b.group, &b.id)));
    for n in sorted {
        columns
            .entry(depth.get(&n.group).copied().unwrap_or(0))
            .or_default()
            .push(n);
    }
    let column_height = |col: &[&NodeSpec]| -> f64 {
        col.iter().map(|n| n.h).sum::<f64>() + ROW_GAP * (col.len().saturating_sub(1) as f64)
    };
    let tallest = columns
        .values()
        .map(|c| column_height(c))
        .fold(0.0, f64::max);
    let widest_label = labels.iter().map(|l| l.0).fold(0.0, f64::max);
    let column_gap = COLUMN_GAP.max(widest_label + 60.0);
    // With boxes, each group's first node leaves room for the title strip above it.
    let boxed = group_boxes.is_some();
    let mut placed = BTreeMap::new();
    let mut x = MARGIN;
    for col in columns.values() {
        let widest = col.iter().map(|n| n.w).fold(0.0, f64::max);
        let mut y = MARGIN + (tallest - column_height(col)) / 2.0;
        let mut previous_group: Option<&str> = None;
        for n in col {
            // Versions of one app sit closer together than separate apps.
            let same_group = previous_group.is_some_and(|g| g == n.group);
            if same_group {
                y -= ROW_GAP / 2.0;
            } else if boxed {
                y += GROUP_TITLE;
            }
            placed.insert(
                n.id.clone(),
                Rect {
                    x: x + (widest - n.w) / 2.0,
                    y,
                    w: n.w,
                    h: n.h,
                },
            );
            y += n.h + ROW_GAP;
            previous_group = Some(&n.group);
        }
        x += widest + column_gap;
    }
    let groups: BTreeMap<String, Rect> = match group_boxes {
        None => BTreeMap::new(),
        Some(titles) => {
            let mut members: BTreeMap<&str, Vec<&Rect>> = BTreeMap::new();
            for n in nodes {
                if let Some(r) = placed.get(&n.id) {
                    members.entry(n.group.as_str()).or_default().push(r);
                }
            }
            members
                .into_iter()
                .map(|(g, rects)| {
                    let left = rects.iter().map(|r| r.x).fold(f64::INFINITY, f64::min);
                    let right = rects.iter().map(|r| r.x + r.w).fold(0.0, f64::max);
                    let top = rects.iter().map(|r| r.y).fold(f64::INFINITY, f64::min);
                    let bottom = rects.iter().map(|r| r.y + r.h).fold(0.0, f64::max);
                    let title = titles.get(g).copied().unwrap_or(0.0) + 2.0 * GROUP_PAD;
                    let w = (right - left + 2.0 * GROUP_PAD).max(title);
                    let cx = (left + right) / 2.0;
                    let rect = Rect {
                        x: cx - w / 2.0,
                        y: top - GROUP_TITLE - GROUP_PAD,
                        w,
                        h: bottom - top + GROUP_TITLE + 2.0 * GROUP_PAD,
                    };
                    (g.to_string(), rect)
                })
                .collect()
        }
    };
    let obstacles: Vec<Rect> = placed.values().chain(groups.values()).copied().collect();
    let mut boxes: Vec<Rect> = Vec::with_capacity(edges.len());
    for ((s, d), (w, h)) in edges.iter().zip(labels) {
        let label = match (placed.get(s), placed.get(d)) {
            (Some(a), Some(b)) => place_label(
                (a.cx(), a.cy()),
                (b.cx(), b.cy()),
                *w,
                *h,
                &obstacles,
                &boxes,
            ),
            _ => place_label((0.0, 0.0), (0.0, 0.0), *w, *h, &obstacles, &boxes),
        };
        boxes.push(label);
    }
    fit(placed, groups, boxes)
}

/// A free spot for a `w`×`h` label of the segment a→b: along the segment first (middle,
/// then towards either end, on it or beside it), else the nearest free spot around its middle.
fn place_label(
    a: (f64, f64),
    b: (f64, f64),
    w: f64,
    h: f64,
    nodes: &[Rect],
    labels: &[Rect],
) -> Rect {
    let free = |r: &Rect| {
        nodes.iter().all(|n| !r.overlaps(n, 6.0)) && labels.iter().all(|l| !r.overlaps(l, 3.0))
    };
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len = (dx * dx + dy * dy).sqrt().max(1.0);
    let (nx, ny) = (-dy / len, dx / len);
    for t in [0.5, 0.4, 0.6, 0.3, 0.7, 0.22, 0.78] {
        let (cx, cy) = (a.0 + dx * t, a.1 + dy * t);
        for k in [0.0, 1.0, -1.0, 2.0, -2.0] {
            let off = k * (h / 2.0 + 6.0);
            let r = Rect::centered(cx + nx * off, cy + ny * off, w, h);
            if free(&r) {
                return r;
            }
        }
    }
    let (mx, my) = (a.0 + dx / 2.0, a.1 + dy / 2.0);
    // Rings around the middle; the canvas grows to fit, so a free spot always exists.
    for ring in 1..2000 {
        let radius = f64::from(ring) * 10.0;
        let steps = (8 * ring).min(64);
        for s in 0..steps {
            let angle = f64::from(s) / f64::from(steps) * std::f64::consts::TAU;
            let r = Rect::centered(mx + radius * angle.cos(), my + radius * angle.sin(), w, h);
            if free(&r) {
                return r;
            }
        }
    }
    // Past every obstacle (never reached with fewer than thousands of labels).
    let bottom = nodes
        .iter()
        .chain(labels)
        .map(|r| r.y + r.h)
        .fold(0.0, f64::max);
    Rect::centered(mx, bottom + h, w, h)
}

/// Moves everything so the top-left is at the margin, and sizes the canvas to hold it all.
fn fit(
    mut nodes: BTreeMap<String, Rect>,
    mut groups: BTreeMap<String, Rect>,
    mut labels: Vec<Rect>,
) -> Layout {
    let all = || nodes.values().chain(groups.values()).chain(labels.iter());
    let min_x = all().map(|r| r.x).fold(f64::INFINITY, f64::min);
    let min_y = all().map(|r| r.y).fold(f64::INFINITY, f64::min);
    let (dx, dy) = if min_x.is_finite() {
        (MARGIN - min_x, MARGIN - min_y)
    } else {
        (0.0, 0.0)
    };
    for r in nodes
        .values_mut()
        .chain(groups.values_mut())
        .chain(labels.iter_mut())
    {
        *r = r.shifted(dx, dy);
    }
    let all = || nodes.values().chain(groups.values()).chain(labels.iter());
    let width = all().map(|r| r.x + r.w).fold(0.0, f64::max) + MARGIN;
    let height = all().map(|r| r.y + r.h).fold(0.0, f64::max) + MARGIN;
    Layout {
        nodes,
        groups,
        labels,
        width: width.max(240.0),
        height: height.max(120.0),
    }
}

/// Where the segment from the centre of `a` towards the centre of `b` leaves `a`'s box.
pub fn exit_point(a: &Rect, b: &Rect) -> (f64, f64) {
    let (dx, dy) = (b.cx() - a.cx(), b.cy() - a.cy());
    if dx == 0.0 && dy == 0.0 {
        return (a.cx(), a.cy());
    }
    let sx = if dx == 0.0 {
        f64::INFINITY
    } else {
        (a.w / 2.0) / dx.abs()
    };
    let sy = if dy == 0.0 {
        f64::INFINITY
    } else {
        (a.h / 2.0) / dy.abs()
    };
    let s = sx.min(sy);
    (a.cx() + dx * s, a.cy() + dy * s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, group: &str) -> NodeSpec {
        NodeSpec {
            id: id.into(),
            group: group.into(),
            w: text_width(id, 7.5) + 20.0,
            h: 30.0,
        }
    }

    /// A mesh of `n` services: a few front doors calling layers below them.
    pub(crate) fn mesh(n: usize) -> (Vec<NodeSpec>, Vec<(String, String)>) {
        let nodes: Vec<NodeSpec> = (0..n)
            .map(|i| spec(&format!("service-{i:03}"), &format!("service-{i:03}")))
            .collect();
        let mut edges = Vec::new();
        for i in 1..n {
            edges.push((nodes[(i - 1) / 3].id.clone(), nodes[i].id.clone()));
            if i % 4 == 0 {
                edges.push((nodes[i / 2].id.clone(), nodes[i].id.clone()));
            }
        }
        (nodes, edges)
    }

    fn assert_no_overlaps(l: &Layout) {
        let nodes: Vec<&Rect> = l.nodes.values().collect();
        for (i, a) in nodes.iter().enumerate() {
            for b in &nodes[i + 1..] {
                assert!(!a.overlaps(b, 0.0), "nodes {a:?} and {b:?} overlap");
            }
            for label in &l.labels {
                assert!(!a.overlaps(label, 0.0), "label {label:?} on node {a:?}");
            }
        }
        for (i, a) in l.labels.iter().enumerate() {
            for b in &l.labels[i + 1..] {
                assert!(!a.overlaps(b, 0.0), "labels {a:?} and {b:?} overlap");
            }
        }
        for r in l.nodes.values().chain(&l.labels) {
            assert!(r.x >= 0.0 && r.y >= 0.0, "{r:?} off the canvas");
            assert!(
                r.x + r.w <= l.width && r.y + r.h <= l.height,
                "{r:?} off the canvas"
            );
        }
    }

    #[test]
    fn callers_left_of_callees_and_labels_clear_of_everything() {
        for n in [4, 20, 100] {
            let (nodes, edges) = mesh(n);
            let labels = vec![(190.0, 44.0); edges.len()];
            let l = layout(&nodes, &edges, &labels, &None);
            assert_eq!(l.nodes.len(), n);
            assert_eq!(l.labels.len(), edges.len());
            for (s, d) in &edges {
                assert!(l.nodes[s].x < l.nodes[d].x, "{s} left of {d}");
            }
            assert_no_overlaps(&l);
        }
    }

    #[test]
    fn versions_of_one_app_share_a_column_and_the_layout_is_stable() {
        let nodes = vec![
            spec("productpage v1", "productpage"),
            spec("reviews v1", "reviews"),
            spec("reviews v2", "reviews"),
            spec("ratings v1", "ratings"),
        ];
        let edges: Vec<(String, String)> = [
            ("productpage v1", "reviews v1"),
            ("productpage v1", "reviews v2"),
            ("reviews v2", "ratings v1"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let labels = vec![(150.0, 44.0); 3];
        let l = layout(&nodes, &edges, &labels, &None);
        assert_eq!(l.nodes["reviews v1"].x, l.nodes["reviews v2"].x);
        assert!(l.nodes["reviews v2"].x < l.nodes["ratings v1"].x);
        assert_no_overlaps(&l);
        let mut reversed = nodes.clone();
        reversed.reverse();
        assert_eq!(
            layout(&reversed, &edges, &labels, &None),
            l,
            "order of input does not matter"
        );
    }

    #[test]
    fn cycles_terminate() {
        let nodes = vec![spec("a", "a"), spec("b", "b")];
        let edges = vec![
            ("a".to_string(), "b".to_string()),
            ("b".to_string(), "a".to_string()),
        ];
        let l = layout(&nodes, &edges, &[(100.0, 30.0), (100.0, 30.0)], &None);
        assert_eq!(l.nodes.len(), 2);
        assert_no_overlaps(&l);
    }

    #[test]
    fn edges_leave_a_box_at_its_border() {
        let a = Rect::centered(0.0, 0.0, 100.0, 30.0);
        let b = Rect::centered(200.0, 0.0, 100.0, 30.0);
        assert_eq!(exit_point(&a, &b), (50.0, 0.0));
        let c = Rect::centered(0.0, 100.0, 100.0, 30.0);
        assert_eq!(exit_point(&a, &c), (0.0, 15.0));
    }
}
