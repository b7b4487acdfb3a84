//! What the node has: its GPUs (NVML, or a declared fake inventory for tests), its CPU and RAM,
//! and how much memory is left for another replica.
//!
//! Memory accounting: every replica that passed the memory check holds a [`Charge`] on one
//! device until it is unloaded. A declared (fake) GPU measures nothing, so its free memory is its
//! total minus the charges of the replicas on it. A measured device (NVML, RAM) already shows a
//! loaded model in its own reading, so only replicas still loading are subtracted from it.

use std::collections::BTreeMap;
use std::fmt;

use crds::gpu_node::{CpuInfo, GpuInfo};

/// One GPU of a `--fake-gpus` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeGpu {
    pub product: String,
    pub memory_bytes: u64,
}

/// Why a `--fake-gpus` list cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FakeGpuError {
    #[error(
        "the list is empty; expected PRODUCT=MEMORY[,PRODUCT=MEMORY...], e.g. \"NVIDIA L4=24GiB\""
    )]
    Empty,
    #[error(
        "entry {index} ({entry:?}) is empty; expected PRODUCT=MEMORY, e.g. \"NVIDIA L4=24GiB\""
    )]
    EmptyEntry { index: usize, entry: String },
    #[error(
        "entry {index} ({entry:?}) has no '='; expected PRODUCT=MEMORY, e.g. \"NVIDIA L4=24GiB\""
    )]
    MissingEquals { index: usize, entry: String },
    #[error("entry {index} ({entry:?}) has no product name before '='")]
    MissingProduct { index: usize, entry: String },
    #[error(
        "entry {index} ({entry:?}): {memory:?} is not a memory size; use a number with a unit such as 24GiB, 80GB, 512MiB or 16Gi"
    )]
    BadMemory {
        index: usize,
        entry: String,
        memory: String,
    },
    #[error("entry {index} ({entry:?}): the memory size must be more than 0 bytes")]
    ZeroMemory { index: usize, entry: String },
}

/// Parses `"NVIDIA L4=24GiB,NVIDIA L4=24GiB"`: comma-separated `PRODUCT=MEMORY` pairs. Product
/// names may contain spaces; surrounding spaces are ignored.
pub fn parse_fake_gpus(spec: &str) -> Result<Vec<FakeGpu>, FakeGpuError> {
    if spec.trim().is_empty() {
        return Err(FakeGpuError::Empty);
    }
    spec.split(',')
        .enumerate()
        .map(|(index, raw)| {
            let entry = raw.trim().to_string();
            if entry.is_empty() {
                return Err(FakeGpuError::EmptyEntry { index, entry });
            }
            let Some((product, memory)) = entry.rsplit_once('=') else {
                return Err(FakeGpuError::MissingEquals { index, entry });
            };
            let product = product.trim().to_string();
            if product.is_empty() {
                return Err(FakeGpuError::MissingProduct { index, entry });
            }
            let memory_bytes =
                parse_memory(memory.trim()).ok_or_else(|| FakeGpuError::BadMemory {
                    index,
                    entry: entry.clone(),
                    memory: memory.trim().to_string(),
                })?;
            if memory_bytes == 0 {
                return Err(FakeGpuError::ZeroMemory { index, entry });
            }
            Ok(FakeGpu {
                product,
                memory_bytes,
            })
        })
        .collect()
}

/// Bytes in `24GiB`, `24 GiB`, `24Gi`, `80GB`, `80G`, `1.5GiB`, `512MiB` or `1000` (bytes).
/// Binary units (`KiB`/`Ki`, `MiB`/`Mi`, ...) are powers of 1024, decimal ones (`KB`/`k`,
/// `MB`/`M`, ...) powers of 1000. `None` when it is not such a size.
pub fn parse_memory(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') {
        return None;
    }
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "k" | "K" | "kB" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "Ki" | "KiB" => 1024.0,
        "Mi" | "MiB" => 1024f64.powi(2),
        "Gi" | "GiB" => 1024f64.powi(3),
        "Ti" | "TiB" => 1024f64.powi(4),
        _ => return None,
    };
    let bytes = (n * mult).floor();
    (bytes.is_finite() && bytes >= 0.0 && bytes < i64::MAX as f64).then_some(bytes as u64)
}

/// Where a replica's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Device {
    /// The GPU with this index.
    Gpu(u32),
    /// System RAM (no GPU on the node).
    Cpu,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Gpu(i) => write!(f, "GPU {i}"),
            Device::Cpu => f.write_str("RAM"),
        }
    }
}

/// One GPU as read now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuReading {
    pub index: u32,
    pub uuid: String,
    pub product: String,
    pub total_bytes: u64,
    /// Free memory as the driver reports it; `None` for a declared (fake) GPU.
    pub measured_free_bytes: Option<u64>,
}

/// Memory held by one replica that passed the memory check, until it is unloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub device: Device,
    pub bytes: u64,
    /// Loaded: a measured device already shows it in its reading.
    pub loaded: bool,
}

/// Free bytes of one device as reported in the GPUNode: a measured device's reading, or a
/// declared device's total minus what loaded replicas hold. Replicas still loading are not
/// subtracted here: the operator accounts for them through their reservation.
pub fn reported_free(
    total: u64,
    measured_free: Option<u64>,
    device: Device,
    charges: &[&Charge],
) -> u64 {
    match measured_free {
        Some(free) => free,
        None => {
            let held: u64 = charges
                .iter()
                .filter(|c| c.device == device && c.loaded)
                .map(|c| c.bytes)
                .sum();
            total.saturating_sub(held)
        }
    }
}

/// Free bytes of one device for the memory check: the reported free memory minus what replicas
/// admitted but still loading will take.
pub fn admission_free(
    total: u64,
    measured_free: Option<u64>,
    device: Device,
    charges: &[&Charge],
) -> u64 {
    let loading: u64 = charges
        .iter()
        .filter(|c| c.device == device && !c.loaded)
        .map(|c| c.bytes)
        .sum();
    reported_free(total, measured_free, device, charges).saturating_sub(loading)
}

/// What the node has, read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub gpus: Vec<GpuReading>,
    pub cpu_cores: u32,
    pub ram_total_bytes: u64,
    pub ram_available_bytes: u64,
}

impl Snapshot {
    /// The GPUs as the GPUNode status reports them, with free memory per [`reported_free`].
    pub fn gpu_infos(&self, charges: &[&Charge]) -> Vec<GpuInfo> {
        self.gpus
            .iter()
            .map(|g| GpuInfo {
                index: g.index,
                uuid: g.uuid.clone(),
                product: g.product.clone(),
                memory_total_bytes: to_i64(g.total_bytes),
                memory_free_bytes: to_i64(reported_free(
                    g.total_bytes,
                    g.measured_free_bytes,
                    Device::Gpu(g.index),
                    charges,
                )),
            })
            .collect()
    }

    /// CPU and RAM as the GPUNode status reports them.
    pub fn cpu_info(&self) -> CpuInfo {
        CpuInfo {
            cores: self.cpu_cores,
            memory_total_bytes: to_i64(self.ram_total_bytes),
            memory_free_bytes: to_i64(self.ram_available_bytes),
        }
    }

    /// Free bytes per device for the memory check: every GPU, or RAM on a node without GPUs.
    pub fn admission_free(&self, charges: &[&Charge]) -> BTreeMap<Device, u64> {
        if self.gpus.is_empty() {
            let free = admission_free(
                self.ram_total_bytes,
                Some(self.ram_available_bytes),
                Device::Cpu,
                charges,
            );
            return BTreeMap::from([(Device::Cpu, free)]);
        }
        self.gpus
            .iter()
            .map(|g| {
                let d = Device::Gpu(g.index);
                (
                    d,
                    admission_free(g.total_bytes, g.measured_free_bytes, d, charges),
                )
            })
            .collect()
    }
}

/// Where a replica needing `needed` bytes goes: the device with the most free memory, when it
/// fits there. `Err((device, free))` names the roomiest device and its free bytes when nothing fits.
pub fn pick_device(free: &BTreeMap<Device, u64>, needed: u64) -> Result<Device, (Device, u64)> {
    // The roomiest device; on a tie the lowest index (BTreeMap order, `max_by_key` keeps the last).
    let best = free
        .iter()
        .rev()
        .max_by_key(|(_, f)| **f)
        .map(|(d, f)| (*d, *f))
        .unwrap_or((Device::Cpu, 0));
    if best.1 >= needed {
        Ok(best.0)
    } else {
        Err(best)
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo` text, in bytes.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let mut parts = rest.split_whitespace();
            let n: u64 = parts.next()?.parse().ok()?;
            let mult = match parts.next() {
                Some("kB") => 1024,
                None => 1,
                Some(_) => return None,
            };
            n.checked_mul(mult)
        })
    };
    let total = field("MemTotal")?;
    let available = field("MemAvailable").or_else(|| field("MemFree"))?;
    Some((total, available))
}

/// Rounds a measured byte count down to 16 MiB, so tiny fluctuations of a reading do not make
/// every refresh a new GPUNode status.
pub fn quantize(bytes: u64) -> u64 {
    const STEP: u64 = 16 * 1024 * 1024;
    bytes / STEP * STEP
}

enum Source {
    Fake(Vec<FakeGpu>),
    Nvml(Box<nvml_wrapper::Nvml>),
    CpuOnly,
}

/// The node's inventory: a declared fake list, NVML, or CPU only.
pub struct Inventory {
    node: String,
    source: Source,
}

impl fmt::Debug for Inventory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.source {
            Source::Fake(g) => format!("fake ({} GPUs)", g.len()),
            Source::Nvml(_) => "nvml".to_string(),
            Source::CpuOnly => "cpu-only".to_string(),
        };
        f.debug_struct("Inventory")
            .field("node", &self.node)
            .field("source", &kind)
            .finish()
    }
}

impl Inventory {
    /// The declared GPUs when given; else, in builds with CUDA, NVML, falling back to CPU only
    /// when the NVIDIA management library cannot be loaded or initialised (logged). Builds
    /// without CUDA report CPU and RAM only.
    pub fn detect(node: &str, fake: Option<Vec<FakeGpu>>) -> Self {
        let source = match fake {
            Some(gpus) => {
                tracing::info!(gpus = gpus.len(), "using the declared (fake) GPU inventory");
                Source::Fake(gpus)
            }
            // Without CUDA the engine runs on the CPU: GPUs would be placed on but never used.
            None if !cfg!(feature = "cuda") => {
                tracing::info!(
                    "built without CUDA: models run on the CPU, so the inventory is CPU and RAM (any GPUs stay unused)"
                );
                Source::CpuOnly
            }
            None => match nvml_wrapper::Nvml::init() {
                Ok(nvml) => {
                    let count = nvml.device_count().unwrap_or(0);
                    tracing::info!(gpus = count, "NVML initialised");
                    Source::Nvml(Box::new(nvml))
                }
                Err(e) => {
                    tracing::warn!(error = %e,
                        "NVML (libnvidia-ml) is not available; reporting a CPU-only inventory (no GPUs)");
                    Source::CpuOnly
                }
            },
        };
        Self {
            node: node.to_string(),
            source,
        }
    }

    /// A fake inventory (tests).
    pub fn fake(node: &str, gpus: Vec<FakeGpu>) -> Self {
        Self {
            node: node.to_string(),
            source: Source::Fake(gpus),
        }
    }

    /// A CPU-only inventory (tests).
    pub fn cpu_only(node: &str) -> Self {
        Self {
            node: node.to_string(),
            source: Source::CpuOnly,
        }
    }

    /// Whether free GPU memory is measured (NVML) rather than computed.
    pub fn is_measured(&self) -> bool {
        matches!(self.source, Source::Nvml(_))
    }

    /// Reads the GPUs, CPU and RAM now.
    pub fn snapshot(&self) -> Snapshot {
        let gpus = match &self.source {
            Source::Fake(list) => list
                .iter()
                .enumerate()
                .map(|(i, g)| GpuReading {
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                    uuid: format!("fake-{}-{i}", self.node),
                    product: g.product.clone(),
                    total_bytes: g.memory_bytes,
                    measured_free_bytes: None,
                })
                .collect(),
            Source::Nvml(nvml) => read_nvml(nvml),
            Source::CpuOnly => Vec::new(),
        };
        let cpu_cores = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1);
        let (ram_total_bytes, ram_available_bytes) = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| parse_meminfo(&t))
            .unwrap_or((0, 0));
        Snapshot {
            gpus,
            cpu_cores,
            ram_total_bytes,
            ram_available_bytes: quantize(ram_available_bytes),
        }
    }
}

fn read_nvml(nvml: &nvml_wrapper::Nvml) -> Vec<GpuReading> {
    let count = match nvml.device_count() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "NVML: cannot count GPUs");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for index in 0..count {
        let device = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(index, error = %e, "NVML: cannot open GPU; leaving it out");
                continue;
            }
        };
        let memory = match device.memory_info() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(index, error = %e, "NVML: cannot read GPU memory; leaving it out");
                continue;
            }
        };
        out.push(GpuReading {
            index,
            uuid: device.uuid().unwrap_or_else(|_| format!("GPU-{index}")),
            product: device.name().unwrap_or_else(|_| "unknown".into()),
            total_bytes: memory.total,
            measured_free_bytes: Some(quantize(memory.free)),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024 * 1024 * 1024;

    #[test]
    fn parses_fake_gpu_lists() {
        let gpus = parse_fake_gpus("NVIDIA L4=24GiB, NVIDIA L4 = 24GiB,NVIDIA H100 80GB HBM3=80GB")
            .expect("valid list");
        assert_eq!(
            gpus,
            vec![
                FakeGpu {
                    product: "NVIDIA L4".into(),
                    memory_bytes: 24 * GIB
                },
                FakeGpu {
                    product: "NVIDIA L4".into(),
                    memory_bytes: 24 * GIB
                },
                FakeGpu {
                    product: "NVIDIA H100 80GB HBM3".into(),
                    memory_bytes: 80_000_000_000
                },
            ]
        );
        assert_eq!(
            parse_fake_gpus("T4=16Gi").expect("k8s unit")[0].memory_bytes,
            16 * GIB
        );
        assert_eq!(
            parse_fake_gpus("T4=1.5GiB").expect("fraction")[0].memory_bytes,
            3 * GIB / 2
        );
    }

    #[test]
    fn bad_fake_gpu_lists_say_what_is_wrong() {
        assert_eq!(parse_fake_gpus("  "), Err(FakeGpuError::Empty));
        assert!(matches!(
            parse_fake_gpus("L4=24GiB,,L4=24GiB"),
            Err(FakeGpuError::EmptyEntry { index: 1, .. })
        ));
        let e = parse_fake_gpus("NVIDIA L4").expect_err("no =");
        assert!(matches!(e, FakeGpuError::MissingEquals { index: 0, .. }));
        assert!(e.to_string().contains("expected PRODUCT=MEMORY"), "{e}");
        assert!(matches!(
            parse_fake_gpus("=24GiB"),
            Err(FakeGpuError::MissingProduct { index: 0, .. })
        ));
        let e = parse_fake_gpus("L4=24GiB,L4=lots").expect_err("bad size");
        assert!(
            matches!(&e, FakeGpuError::BadMemory { index: 1, memory, .. } if memory == "lots"),
            "{e}"
        );
        assert!(
            e.to_string().contains("24GiB"),
            "message suggests a form: {e}"
        );
        assert!(matches!(
            parse_fake_gpus("L4=24XB"),
            Err(FakeGpuError::BadMemory { .. })
        ));
        assert!(matches!(
            parse_fake_gpus("L4=0GiB"),
            Err(FakeGpuError::ZeroMemory { .. })
        ));
        assert!(matches!(
            parse_fake_gpus("L4="),
            Err(FakeGpuError::BadMemory { .. })
        ));
    }

    #[test]
    fn parses_memory_sizes() {
        assert_eq!(parse_memory("1000"), Some(1000));
        assert_eq!(parse_memory("512MiB"), Some(512 * 1024 * 1024));
        assert_eq!(parse_memory("512 MiB"), Some(512 * 1024 * 1024));
        assert_eq!(parse_memory("2G"), Some(2_000_000_000));
        assert_eq!(parse_memory("-1GiB"), None);
        assert_eq!(parse_memory(".5GiB"), None);
        assert_eq!(parse_memory("GiB"), None);
        assert_eq!(parse_memory("1e9"), None);
    }

    fn charge(device: Device, bytes: u64, loaded: bool) -> Charge {
        Charge {
            device,
            bytes,
            loaded,
        }
    }

    #[test]
    fn declared_gpus_subtract_what_is_loaded_on_them() {
        let loaded = charge(Device::Gpu(0), 5 * GIB, true);
        let loading = charge(Device::Gpu(0), 3 * GIB, false);
        let other = charge(Device::Gpu(1), 7 * GIB, true);
        let charges = [&loaded, &loading, &other];
        // Reported: total minus loaded replicas only (the operator counts loading ones itself).
        assert_eq!(
            reported_free(24 * GIB, None, Device::Gpu(0), &charges),
            19 * GIB
        );
        // Admission: also minus replicas still loading.
        assert_eq!(
            admission_free(24 * GIB, None, Device::Gpu(0), &charges),
            16 * GIB
        );
        assert_eq!(
            admission_free(24 * GIB, None, Device::Gpu(1), &charges),
            17 * GIB
        );
        // Never below zero.
        assert_eq!(admission_free(GIB, None, Device::Gpu(0), &charges), 0);
    }

    #[test]
    fn measured_devices_already_show_loaded_models() {
        let loaded = charge(Device::Cpu, 5 * GIB, true);
        let loading = charge(Device::Cpu, 3 * GIB, false);
        let charges = [&loaded, &loading];
        assert_eq!(
            reported_free(64 * GIB, Some(40 * GIB), Device::Cpu, &charges),
            40 * GIB
        );
        assert_eq!(
            admission_free(64 * GIB, Some(40 * GIB), Device::Cpu, &charges),
            37 * GIB
        );
    }

    #[test]
    fn snapshot_reports_fake_gpus_and_picks_the_roomiest() {
        let inv = Inventory::fake(
            "n1",
            parse_fake_gpus("NVIDIA L4=24GiB,NVIDIA L4=24GiB").expect("list"),
        );
        let snap = inv.snapshot();
        let a = charge(Device::Gpu(0), 10 * GIB, true);
        let infos = snap.gpu_infos(&[&a]);
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[0].uuid, "fake-n1-0");
        assert_eq!(infos[1].uuid, "fake-n1-1");
        assert_eq!(infos[0].memory_free_bytes, (14 * GIB) as i64);
        assert_eq!(infos[1].memory_free_bytes, (24 * GIB) as i64);
        assert_eq!(infos[0].memory_total_bytes, (24 * GIB) as i64);
        let free = snap.admission_free(&[&a]);
        assert_eq!(pick_device(&free, 20 * GIB), Ok(Device::Gpu(1)));
        assert_eq!(
            pick_device(&free, 25 * GIB),
            Err((Device::Gpu(1), 24 * GIB))
        );
        // Equal room: the lowest index.
        let free = snap.admission_free(&[]);
        assert_eq!(pick_device(&free, GIB), Ok(Device::Gpu(0)));
    }

    #[test]
    fn cpu_only_nodes_check_against_ram() {
        let snap = Snapshot {
            gpus: Vec::new(),
            cpu_cores: 8,
            ram_total_bytes: 32 * GIB,
            ram_available_bytes: 20 * GIB,
        };
        let loading = charge(Device::Cpu, 4 * GIB, false);
        let free = snap.admission_free(&[&loading]);
        assert_eq!(free, BTreeMap::from([(Device::Cpu, 16 * GIB)]));
        assert_eq!(pick_device(&free, 17 * GIB), Err((Device::Cpu, 16 * GIB)));
        assert_eq!(snap.cpu_info().cores, 8);
    }

    #[test]
    fn reads_meminfo() {
        let text =
            "MemTotal:       16384000 kB\nMemFree:         1000 kB\nMemAvailable:    8192000 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some((16_384_000 * 1024, 8_192_000 * 1024))
        );
        assert_eq!(
            parse_meminfo("MemTotal: 10 kB\nMemFree: 4 kB\n"),
            Some((10 * 1024, 4 * 1024)),
            "old kernels without MemAvailable"
        );
        assert_eq!(parse_meminfo("garbage"), None);
        assert_eq!(quantize(16 * 1024 * 1024 + 5), 16 * 1024 * 1024);
    }
}
