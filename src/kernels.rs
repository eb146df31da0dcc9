//! What the build compiled: kernel sources, and (feature `cuda`) the PTX
//! embedded for each architecture.

/// One kernel source compiled to PTX for one architecture.
#[derive(Debug, Clone, Copy)]
pub struct PtxModule {
    /// The op's name (`kernels/NAME.cu`).
    pub name: &'static str,
    /// The SM architecture, e.g. 80 for `sm_80`.
    pub arch: u32,
    /// The PTX text.
    pub ptx: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
include!(concat!(env!("OUT_DIR"), "/kernel_list.rs"));

/// The embedded PTX of kernel `name` best suited to a device of compute
/// capability `major.minor`: the highest architecture not above the
/// device's (PTX is forward compatible, so `sm_80` code runs on sm_86/89).
pub fn ptx_for(name: &str, major: u32, minor: u32) -> Option<&'static PtxModule> {
    let cc = major * 10 + minor;
    PTX_MODULES
        .iter()
        .filter(|m| m.name == name && m.arch <= cc)
        .max_by_key(|m| m.arch)
}
