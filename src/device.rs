//! Where tensors run: a `--device` as users write it (`auto`, `cpu`,
//! `cuda`, `cuda:N`) to a [`Device`], and back.

use tch::Device;

/// Picks the device: `auto` is the first CUDA device when there is one.
pub fn parse_device(spec: &str) -> Result<Device, String> {
    match spec {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("unknown device {other:?}; use auto, cpu or cuda:N")),
    }
}

/// A device's name as users write it.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_as_the_same_device() {
        for device in [Device::Cpu, Device::Cuda(0), Device::Cuda(3)] {
            assert_eq!(parse_device(&device_name(device)), Ok(device));
        }
        assert_eq!(parse_device("cuda"), Ok(Device::Cuda(0)));
        assert!(parse_device("gpu").is_err());
        assert!(parse_device("cuda:x").is_err());
    }
}
