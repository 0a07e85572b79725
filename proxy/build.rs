//! Link the `lumen-proxy` binary with packed relative relocations (DT_RELR, glibc 2.36 and
//! later): a position-independent executable's table of relative relocations, read whole by
//! the loader at every start and so resident in every sidecar, shrinks from about 350 KB to
//! a few KB, and ASLR is kept.

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
