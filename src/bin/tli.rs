//! The `tli` command-line driver (being written).
fn main() {
    println!("tli {}", env!("CARGO_PKG_VERSION"));
}
