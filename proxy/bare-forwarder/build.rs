//! Linked as `lumen-proxy` is (see its build.rs: packed relative relocations), so the
//! benchmark compares two binaries built the same way.

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
