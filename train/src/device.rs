//! The `--device` argument: which backend runs, and a clear error for one not compiled in.

use std::fmt;
use std::str::FromStr;

/// A backend and device chosen on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// The Flex CPU backend.
    Cpu,
    /// The default WGPU adapter.
    Wgpu,
    /// CUDA device N.
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown device `{s}`: expected cpu, wgpu, cuda or cuda:N"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Wgpu => f.write_str("wgpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Error for a backend that this binary was built without.
pub fn not_compiled(device: DeviceArg, feature: &str) -> String {
    format!(
        "device `{device}` needs the `{feature}` backend, which this binary was built without; \
         rebuild with `cargo run --release -p hylo-train --features {feature} -- ...`"
    )
}

/// The WGPU adapter this process computes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgpuAdapter {
    /// Adapter name (`llvmpipe (LLVM 15.0.6, 256 bits)` for Mesa's lavapipe).
    pub name: String,
    /// Driver and its version.
    pub driver: String,
    /// Graphics API (`Vulkan`, `Metal`, ...).
    pub api: String,
    /// A software rasteriser running on the CPU (lavapipe, WARP, SwiftShader): its timings are
    /// CPU-emulated, not GPU figures.
    pub software: bool,
}

impl fmt::Display for WgpuAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {})", self.name, self.api, self.driver)?;
        if self.software {
            f.write_str(
                " [software rasteriser on the CPU: times are CPU-emulated, not GPU figures]",
            )?;
        }
        Ok(())
    }
}

/// Initialises Burn's default WGPU device once per process and says which adapter it got; an
/// error (not a panic) when the machine has no usable adapter.
#[cfg(feature = "wgpu")]
pub fn wgpu_adapter() -> Result<WgpuAdapter, String> {
    use burn::backend::wgpu::{graphics::AutoGraphicsApi, init_setup, RuntimeOptions, WgpuDevice};
    static ADAPTER: std::sync::OnceLock<Result<WgpuAdapter, String>> = std::sync::OnceLock::new();
    ADAPTER
        .get_or_init(|| {
            let setup = std::panic::catch_unwind(|| {
                init_setup::<AutoGraphicsApi>(&WgpuDevice::default(), RuntimeOptions::default())
            })
            .map_err(|panic| {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                format!(
                    "no WGPU adapter could be opened ({why}); on Linux without a GPU install \
                     Mesa's software Vulkan driver: apt-get install mesa-vulkan-drivers libvulkan1"
                )
            })?;
            let info = setup.adapter.get_info();
            let kind = format!("{:?}", info.device_type);
            Ok(WgpuAdapter {
                name: info.name,
                driver: format!("{} {}", info.driver, info.driver_info)
                    .trim()
                    .to_string(),
                api: format!("{:?}", info.backend),
                software: kind == "Cpu",
            })
        })
        .clone()
}

/// Checks once per device that CUDA device `index` can run a kernel: an error (not a panic)
/// when there is no driver or no such device.
#[cfg(feature = "cuda")]
pub fn cuda_ready(index: usize) -> Result<(), String> {
    use burn::backend::cuda::CudaDevice;
    use burn::backend::Cuda;
    use burn::tensor::Tensor;
    static READY: std::sync::Mutex<Vec<(usize, Result<(), String>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, r)) = ready.iter().find(|(i, _)| *i == index) {
        return r.clone();
    }
    let probe = std::panic::catch_unwind(|| {
        let t = Tensor::<Cuda, 1>::ones([1], &CudaDevice::new(index));
        t.into_data()
    });
    let result = probe.map(|_| ()).map_err(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("CUDA device {index} cannot be used ({why}): is an NVIDIA driver installed and the device visible?")
    });
    ready.push((index, result.clone()));
    result
}

/// Whether this build has Burn's autotune (features `cuda` or `autotune`): one switch for every
/// GPU backend of the build.
pub const AUTOTUNE: bool = cfg!(feature = "autotune");

/// `autotune on`/`autotune off`, for the run log.
pub fn autotune_state() -> &'static str {
    if AUTOTUNE {
        "autotune on"
    } else {
        "autotune off"
    }
}

/// Refuses a CPU-emulated WGPU adapter in a build with autotune: on lavapipe it picked a
/// reduction that returns zeros for long rows (wrong results, not slow ones).
pub fn check_autotune(adapter_is_software: bool, autotune: bool) -> Result<(), String> {
    if adapter_is_software && autotune {
        return Err(
            "this build has Burn's autotune (feature cuda or autotune), which on a \
                    CPU-emulated WGPU adapter such as lavapipe picks kernels that return wrong \
                    sums; build without the cuda and autotune features (the default build) to run on it"
                .into(),
        );
    }
    Ok(())
}

/// The WGPU adapter, checked against this build's autotune.
#[cfg(feature = "wgpu")]
pub fn wgpu_checked() -> Result<WgpuAdapter, String> {
    let adapter = wgpu_adapter()?;
    check_autotune(adapter.software, AUTOTUNE)?;
    Ok(adapter)
}

/// What computes for `device`: the backend and, for WGPU, the adapter (which it initialises);
/// GPU backends say whether Burn's autotune is on.
pub fn describe(device: DeviceArg) -> Result<String, String> {
    match device {
        DeviceArg::Cpu => Ok("cpu: Burn's Flex backend".into()),
        #[cfg(feature = "wgpu")]
        DeviceArg::Wgpu => Ok(format!("wgpu: {}, {}", wgpu_checked()?, autotune_state())),
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda(n) => {
            cuda_ready(n).map(|()| format!("cuda:{n}: Burn's CUDA backend, {}", autotune_state()))
        }
        #[allow(unreachable_patterns)]
        d @ DeviceArg::Wgpu => Err(not_compiled(d, "wgpu")),
        #[allow(unreachable_patterns)]
        d @ DeviceArg::Cuda(_) => Err(not_compiled(d, "cuda")),
    }
}

/// Runs `$body` with `$B` bound to the autodiff backend of `$device` and `$dev` to its device;
/// a backend not compiled in is an error naming the feature.
#[macro_export]
macro_rules! with_backend {
    ($device:expr, |$B:ident, $dev:ident| $body:expr) => {{
        use $crate::device::DeviceArg;
        match $device {
            DeviceArg::Cpu => {
                type $B = burn::backend::Autodiff<burn::backend::Flex>;
                let $dev = Default::default();
                $body
            }
            #[cfg(feature = "wgpu")]
            DeviceArg::Wgpu => match $crate::device::wgpu_checked() {
                Err(e) => Err(e),
                Ok(_) => {
                    type $B = burn::backend::Autodiff<burn::backend::Wgpu>;
                    let $dev = Default::default();
                    $body
                }
            },
            #[cfg(feature = "cuda")]
            DeviceArg::Cuda(index) => match $crate::device::cuda_ready(index) {
                Err(e) => Err(e),
                Ok(()) => {
                    type $B = burn::backend::Autodiff<burn::backend::Cuda>;
                    let $dev = burn::backend::cuda::CudaDevice::new(index);
                    $body
                }
            },
            #[allow(unreachable_patterns)]
            d @ DeviceArg::Wgpu => Err($crate::device::not_compiled(d, "wgpu")),
            #[allow(unreachable_patterns)]
            d @ DeviceArg::Cuda(_) => Err($crate::device::not_compiled(d, "cuda")),
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autotune_is_refused_on_cpu_emulated_adapters_only() {
        assert!(check_autotune(true, false).is_ok());
        assert!(check_autotune(false, true).is_ok());
        let err = check_autotune(true, true).unwrap_err();
        assert!(
            err.contains("without the cuda and autotune features"),
            "{err}"
        );
    }

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse(), Ok(DeviceArg::Cpu));
        assert_eq!("wgpu".parse(), Ok(DeviceArg::Wgpu));
        assert_eq!("cuda".parse(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceArg::Cuda(3)));
        assert!("cuda:x"
            .parse::<DeviceArg>()
            .unwrap_err()
            .contains("cuda:N"));
        assert!("tpu".parse::<DeviceArg>().is_err());
        assert!(not_compiled(DeviceArg::Cuda(1), "cuda").contains("--features cuda"));
    }
}
