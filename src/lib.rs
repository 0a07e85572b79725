//! The `lumen` command's library side: the demo mesh (bookinfo-shaped apps, load generator,
//! and the wiring that runs telemetry, control and sidecars in one process).

#![forbid(unsafe_code)]

pub mod demo;
