//! What the build compiled: kernel sources, and (feature `cuda`) the CUDA
//! images embedded for each kernel file.
//!
//! Per kernel file the build embeds a cubin (SASS) for every architecture in
//! [`CUDA_ARCHS`] and one PTX module for [`PTX_ARCH`], the lowest of them.
//! The PTX is compiled by NVRTC 12.2 (PTX ISA 8.2, at most
//! [`PTX_ISA_MAX`]) and the cubins are assembled from that same PTX by a
//! CUDA 12.x ptxas, so every image loads on drivers from CUDA 12.2 on.
//! [`image_for`] picks the image a device runs.

/// What an embedded image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// A cubin: machine code (SASS) for exactly one architecture family.
    Sass,
    /// PTX text, which the driver JIT-compiles for the device at load time.
    Ptx,
}

/// One embedded image of one kernel file.
#[derive(Debug, Clone, Copy)]
pub struct CudaImage {
    /// The op's name (`kernels/NAME.cu`).
    pub name: &'static str,
    /// The SM architecture, e.g. 80 for `sm_80` (for PTX: its `.target`).
    pub arch: u32,
    /// Cubin or PTX.
    pub kind: ImageKind,
    /// The image as embedded: ELF bytes of a cubin, or the PTX text.
    pub bytes: &'static [u8],
}

impl CudaImage {
    /// The PTX text of a [`ImageKind::Ptx`] image; `None` for a cubin or
    /// for bytes that are not UTF-8.
    pub fn ptx(&self) -> Option<&'static str> {
        match self.kind {
            ImageKind::Ptx => std::str::from_utf8(self.bytes).ok(),
            ImageKind::Sass => None,
        }
    }

    /// The PTX ISA version (`.version X.Y`) of a PTX image.
    pub fn ptx_isa(&self) -> Option<(u32, u32)> {
        let ptx = self.ptx()?;
        let v = ptx
            .lines()
            .find_map(|l| l.trim().strip_prefix(".version "))?;
        let (a, b) = v.trim().split_once('.')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }

    /// A short description: `cubin sm_86 (ptxas release 12.9, V12.9.86)` or
    /// `PTX 8.2 for sm_80 (NVRTC 12.2)`.
    pub fn describe(&self) -> String {
        match self.kind {
            ImageKind::Sass => format!("cubin sm_{} (ptxas {PTXAS_VERSION})", self.arch),
            ImageKind::Ptx => {
                let isa = self
                    .ptx_isa()
                    .map_or("?".to_string(), |(a, b)| format!("{a}.{b}"));
                format!("PTX {isa} for sm_{} (NVRTC {NVRTC_VERSION})", self.arch)
            }
        }
    }
}

include!(concat!(env!("OUT_DIR"), "/cuda_images.rs"));

/// Threads per block of every `nf4_dequant` and `cosine` launch (their
/// kernels' `__launch_bounds__`).
pub const BLOCK_THREADS: u32 = 256;

/// The threads per block the Rust launcher of kernel entry point `entry`
/// uses, for checking it against the kernel's `__launch_bounds__`
/// (`.maxntid`); `None` for a name no launcher knows.
pub fn launch_block_threads(entry: &str) -> Option<u32> {
    use crate::lora::kernel::{AUX_THREADS, GEMV_THREADS, TILE_THREADS};
    const BY_PREFIX: &[(&str, u32)] = &[
        ("nf4_dequant_", BLOCK_THREADS),
        ("cosine_", BLOCK_THREADS),
        ("lora_fwd_tile_", TILE_THREADS),
        ("lora_bwd_dx_", TILE_THREADS),
        ("lora_fwd_gemv_", GEMV_THREADS),
        ("lora_proj_", AUX_THREADS),
        ("lora_bwd_dadb_", AUX_THREADS),
    ];
    BY_PREFIX
        .iter()
        .find(|(p, _)| entry.starts_with(p))
        .map(|&(_, t)| t)
}
include!(concat!(env!("OUT_DIR"), "/kernel_list.rs"));

/// What to tell a user whose driver (supporting CUDA `driver.0`.`driver.1`)
/// refused `image`: the image's toolchain and version, the driver's, and
/// the fix.
pub fn load_failure_hint(image: &CudaImage, driver: (i32, i32)) -> String {
    let (major, minor) = driver;
    match image.kind {
        ImageKind::Ptx => format!(
            "the PTX is ISA {} from NVRTC {NVRTC_VERSION}, newer than this driver (CUDA {major}.{minor}) can \
             compile: update the NVIDIA driver to CUDA 12.2 (R535) or newer, or rebuild with a toolchain whose \
             PTX ISA the driver supports (TLI_PTX_ISA_MAX, {}.{} in this build)",
            image
                .ptx_isa()
                .map_or("?".to_string(), |(a, b)| format!("{a}.{b}")),
            PTX_ISA_MAX.0,
            PTX_ISA_MAX.1
        ),
        ImageKind::Sass => format!(
            "the cubin for sm_{} was assembled by ptxas {PTXAS_VERSION} and this driver supports CUDA \
             {major}.{minor}: cubins from a CUDA 12.x ptxas load on drivers from CUDA 12.0 on, so update the \
             NVIDIA driver (CUDA 12.2 / R535 or newer), or rebuild after `eval \"$(scripts/cuda-env)\"`, whose \
             toolchain writes images such drivers load",
            image.arch
        ),
    }
}

/// The embedded image of kernel `name` a device of compute capability
/// `major.minor` loads.
///
/// 1. SASS of the highest architecture of the same major version not above
///    the device's (cubins run on later minor versions of their major:
///    `sm_80` code runs on sm_86 and sm_89, `sm_86` not on sm_80);
/// 2. else PTX of the highest architecture not above the device's, which
///    the driver JIT-compiles (a GPU newer than every embedded SASS, e.g.
///    sm_100 or sm_120, runs the `sm_80` PTX);
/// 3. else `None`: the device is older than anything embedded.
pub fn image_for(name: &str, major: u32, minor: u32) -> Option<&'static CudaImage> {
    select(CUDA_IMAGES, name, major, minor)
}

/// [`image_for`] over any list of images.
pub fn select<'a>(
    images: &'a [CudaImage],
    name: &str,
    major: u32,
    minor: u32,
) -> Option<&'a CudaImage> {
    let cc = major * 10 + minor;
    let of_kind = |kind: ImageKind| {
        images
            .iter()
            .filter(move |m| m.name == name && m.kind == kind && m.arch <= cc)
    };
    of_kind(ImageKind::Sass)
        .filter(|m| m.arch / 10 == major)
        .max_by_key(|m| m.arch)
        .or_else(|| of_kind(ImageKind::Ptx).max_by_key(|m| m.arch))
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn img(arch: u32, kind: ImageKind) -> CudaImage {
        CudaImage {
            name: "k",
            arch,
            kind,
            bytes: b"",
        }
    }

    /// The default build's images: SASS 80/86/89/90 and PTX 80.
    const DEFAULT: &[CudaImage] = &[
        img(80, ImageKind::Sass),
        img(86, ImageKind::Sass),
        img(89, ImageKind::Sass),
        img(90, ImageKind::Sass),
        img(80, ImageKind::Ptx),
    ];

    fn pick(images: &[CudaImage], major: u32, minor: u32) -> Option<(u32, ImageKind)> {
        select(images, "k", major, minor).map(|m| (m.arch, m.kind))
    }

    #[test]
    fn each_device_gets_exact_sass_else_same_major_sass_else_ptx() {
        use ImageKind::{Ptx, Sass};
        let cases = [
            ((7, 5), None),
            ((8, 0), Some((80, Sass))),
            ((8, 6), Some((86, Sass))),
            ((8, 7), Some((86, Sass))),
            ((8, 9), Some((89, Sass))),
            ((9, 0), Some((90, Sass))),
            ((10, 0), Some((80, Ptx))),
            ((12, 0), Some((80, Ptx))),
        ];
        for ((major, minor), want) in cases {
            assert_eq!(pick(DEFAULT, major, minor), want, "cc {major}.{minor}");
        }
        assert_eq!(select(DEFAULT, "other", 9, 0).map(|m| m.arch), None);
    }

    #[test]
    fn sass_never_crosses_a_major_version() {
        // Only sm_80 SASS and sm_80 PTX: sm_90 must JIT, sm_86 may run sm_80.
        let images = [img(80, ImageKind::Sass), img(80, ImageKind::Ptx)];
        assert_eq!(pick(&images, 9, 0), Some((80, ImageKind::Ptx)));
        assert_eq!(pick(&images, 8, 6), Some((80, ImageKind::Sass)));
        // SASS only: a newer major version has nothing to load.
        assert_eq!(pick(&images[..1], 9, 0), None);
    }

    #[test]
    fn a_refused_image_names_both_versions_and_the_fix() {
        let ptx = CudaImage {
            name: "k",
            arch: 80,
            kind: ImageKind::Ptx,
            bytes: b".version 8.2\n.target sm_80\n",
        };
        let h = load_failure_hint(&ptx, (12, 1));
        for want in [
            "ISA 8.2",
            &format!("NVRTC {NVRTC_VERSION}"),
            "CUDA 12.1",
            "update the NVIDIA driver to CUDA 12.2 (R535)",
        ] {
            assert!(h.contains(want), "{want:?} missing from {h:?}");
        }
        let h = load_failure_hint(&img(86, ImageKind::Sass), (11, 8));
        for want in [
            "sm_86",
            &format!("ptxas {PTXAS_VERSION}"),
            "CUDA 11.8",
            "scripts/cuda-env",
        ] {
            assert!(h.contains(want), "{want:?} missing from {h:?}");
        }
    }

    #[test]
    fn ptx_isa_reads_the_version_line() {
        let m = CudaImage {
            name: "k",
            arch: 80,
            kind: ImageKind::Ptx,
            bytes: b"//\n.version 8.2\n.target sm_80\n",
        };
        assert_eq!(m.ptx_isa(), Some((8, 2)));
        assert_eq!(img(80, ImageKind::Sass).ptx_isa(), None);
    }
}
