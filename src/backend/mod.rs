//! Where an op runs.
//!
//! | device | what runs | role |
//! | --- | --- | --- |
//! | `cpu`  | native Rust, multi-threaded | the reference, and a fast path |
//! | `sim`  | the `.cu` source compiled for the host, under `kernels/sim` | proves kernel logic without a GPU |
//! | `cuda` | embedded PTX through the CUDA driver API | the fast path |

use std::fmt;
use std::str::FromStr;

use crate::Error;

#[cfg(tli_cuda)]
pub mod cuda;
#[cfg(feature = "sim")]
pub mod sim;

/// An execution backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// Native Rust on the host.
    Cpu,
    /// The kernel source under the host simulator.
    Sim,
    /// A CUDA GPU (device 0).
    Cuda,
}

impl Device {
    /// All devices, in order.
    pub const ALL: [Device; 3] = [Device::Cpu, Device::Sim, Device::Cuda];

    /// Lower-case name: `cpu`, `sim`, `cuda`.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Sim => "sim",
            Device::Cuda => "cuda",
        }
    }

    /// Whether this device can run here, and if not, why.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the simulator is not compiled in;
    /// [`Error::NoCudaDevice`] when CUDA is not compiled in or no driver or
    /// device is present.
    pub fn check_available(self) -> Result<(), Error> {
        match self {
            Device::Cpu => Ok(()),
            Device::Sim => {
                if cfg!(feature = "sim") {
                    Ok(())
                } else {
                    Err(Error::invalid(
                        "device sim",
                        "built without the `sim` feature",
                    ))
                }
            }
            Device::Cuda => {
                #[cfg(tli_cuda)]
                {
                    cuda::Cuda::global().map(|_| ())
                }
                #[cfg(not(tli_cuda))]
                {
                    Err(Error::NoCudaDevice {
                        reason: "built without the `cuda` feature (rebuild with `--features cuda`)"
                            .into(),
                    })
                }
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "sim" => Ok(Device::Sim),
            "cuda" | "gpu" => Ok(Device::Cuda),
            other => Err(Error::invalid(
                "device",
                format!("unknown device {other:?} (expected cpu, sim or cuda)"),
            )),
        }
    }
}
