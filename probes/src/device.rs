//! Where a model's passes run: the CPU, or a GPU through candle's CUDA backend when mechwatch
//! is built with the `cuda` feature.

use candle_core::Device;

/// The device named `cpu`, `cuda` (the first GPU) or `cuda:N`.
pub fn device_named(name: &str) -> Result<Device, String> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => name
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| format!("unknown device `{name}`: use `cpu`, `cuda` or `cuda:N`"))?,
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(format!(
            "device `{name}`: this mechwatch was built without the `cuda` feature \
             (build it with `cargo build --release -p mechwatch --features cuda`)"
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| format!("device `{name}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_cpu_and_refuses_unknown_devices() {
        assert!(device_named("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda:", "cuda:x", "metal"] {
            let e = device_named(bad).unwrap_err();
            assert!(e.contains("unknown device"), "{bad}: {e}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_only_build_says_how_to_get_cuda() {
        let e = device_named("cuda").unwrap_err();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
