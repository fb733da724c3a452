#![allow(non_local_definitions)] // abi_stable 0.11 derive output trips this lint on rustc 1.95
#![warn(missing_docs)]
//! The stable ABI between the autoinfer `host` and a *variant* (a `cdylib` it hot-loads).
//!
//! Types only, no I/O. The principal pieces:
//! - [`VariantMod`] / [`VariantModRef`]: the root module a variant exports (a prefix type,
//!   append-only: new fields go after the `last_prefix_field`, never reorder).
//! - [`ModelView`]: the read-only model the host lends: the whole GGUF file as bytes (zero-copy
//!   from the host's mmap, which outlives every variant), its metadata and its tensor index.
//! - [`Variant`] (a `sabi_trait` object, [`VariantBox`]): `generate`, and `score` from a given
//!   position on (the oracle scores answers, never the prompt they follow).
//! - [`TokenSink`]: the host-owned sink a variant streams tokens into; the host timestamps every
//!   `emit` and may answer "stop".
//! - [`HostLog`]: the host's log callback (each cdylib has its own `log`/`tracing` globals).
//! - [`LoadOptions`]: what the host asks of a variant at load time (the thread count, the
//!   [`Device`]), as key/value text so that later options never change a type's layout.
//! - [`Engine`] and [`export_variant!`]: what a variant author writes. The macro wraps every
//!   entry point in `catch_unwind`, so a panic comes back to the host as an error instead of
//!   abi_stable's `exit(1)`.

pub use abi_stable;

use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    prefix_type::PrefixTypeTrait,
    sabi_trait,
    sabi_trait::TD_Opaque,
    sabi_types::VersionStrings,
    std_types::{RBox, RErr, ROk, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

mod model_view;
pub use model_view::{GgmlType, MetaValue, MetadataEntry, ModelView, TensorInfo};

/// The root module every variant exports (through [`export_variant!`]).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = VariantModRef)))]
#[sabi(missing_field(panic))]
pub struct VariantMod {
    /// Builds the variant over the host's model (the view lives for the whole process) with the
    /// host's [`LoadOptions`]. New options are new keys, so this signature does not change.
    #[sabi(last_prefix_field)]
    pub load: extern "C" fn(
        model: &'static ModelView,
        log: HostLog,
        options: &LoadOptions,
    ) -> RResult<VariantBox, RString>,
}

/// One load-time option: a key and its value, both text.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct LoadOption {
    /// The option's name, one of the `LoadOptions` constants.
    pub key: RString,
    /// Its value, as text.
    pub value: RString,
}

/// What the host asks of a variant at load time. Keys the host sends today: [`Self::THREADS`]
/// and [`Self::DEVICE`]. A variant reads the keys it knows and decides how to honour them; a
/// variant that cannot run on the asked device must refuse (see [`LoadOptions::device`]).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default, PartialEq)]
pub struct LoadOptions {
    /// The options in the order they were set, each key once.
    pub entries: RVec<LoadOption>,
}

impl LoadOptions {
    /// The number of threads the variant should compute with (a positive integer).
    pub const THREADS: &'static str = "threads";
    /// Where the variant should compute: a [`Device`] in its text form (`cpu`, `cuda`,
    /// `cuda:1`, `metal`). Absent means `cpu`.
    pub const DEVICE: &'static str = "device";

    /// These options with `key` set to `value` (replacing an earlier value).
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.entries.retain(|e| e.key.as_str() != key);
        self.entries.push(LoadOption {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// The value of `key`, if the host set it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.key.as_str() == key)
            .map(|e| e.value.as_str())
    }

    /// The thread count the host asked for; an error names a value that is not a positive
    /// integer.
    pub fn threads(&self) -> Result<Option<usize>, String> {
        match self.get(Self::THREADS) {
            None => Ok(None),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n > 0 => Ok(Some(n)),
                _ => Err(format!(
                    "load option {}={v:?} is not a positive integer",
                    Self::THREADS
                )),
            },
        }
    }

    /// The device the host asked for ([`Device::Cpu`] when none); an error names a value that
    /// is not a device.
    pub fn device(&self) -> Result<Device, String> {
        match self.get(Self::DEVICE) {
            None => Ok(Device::Cpu),
            Some(v) => v
                .parse()
                .map_err(|e| format!("load option {}={v:?}: {e}", Self::DEVICE)),
        }
    }

    /// `Ok` when the host asked for the CPU; otherwise an error naming `variant` and the device,
    /// for an engine that computes on the CPU only (it must refuse rather than pretend).
    pub fn cpu_only(&self, variant: &str) -> Result<(), String> {
        match self.device()? {
            Device::Cpu => Ok(()),
            device => Err(format!(
                "variant {variant} runs on the CPU only and cannot run on {device}"
            )),
        }
    }
}

/// A compute device, as `host --device` names it and [`LoadOptions::DEVICE`] carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The host's CPU.
    Cpu,
    /// An NVIDIA GPU through CUDA, by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
    /// An Apple GPU through Metal, by ordinal (`metal` is `metal:0`).
    Metal(usize),
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, ordinal) = match s.split_once(':') {
            Some((kind, n)) => {
                let n = n.parse::<usize>().map_err(|_| {
                    format!("device ordinal {n:?} in {s:?} is not a non-negative integer")
                })?;
                (kind, Some(n))
            }
            None => (s, None),
        };
        match (kind, ordinal) {
            ("cpu", None) => Ok(Device::Cpu),
            ("cpu", Some(_)) => Err(format!("{s:?}: the CPU takes no ordinal; say `cpu`")),
            ("cuda", n) => Ok(Device::Cuda(n.unwrap_or(0))),
            ("metal", n) => Ok(Device::Metal(n.unwrap_or(0))),
            _ => Err(format!(
                "unknown device {s:?}: expected cpu, cuda, cuda:N, metal or metal:N"
            )),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl RootModule for VariantModRef {
    declare_root_module_statics! {VariantModRef}
    const BASE_NAME: &'static str = "autoinfer_variant";
    const NAME: &'static str = "autoinfer_variant";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// What the oracle reports for one position of a teacher-forced sequence: the host's one type
/// for a score, from the variant's answer through the worker protocol to the quality gates.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(deny_unknown_fields)
)]
pub struct ScoredPosition {
    /// Natural-log probability of the token that actually comes next.
    pub logprob: f32,
    /// The most likely next token.
    pub argmax: u32,
    /// Its natural-log probability.
    pub argmax_logprob: f32,
}

/// The host-owned sink a variant streams its output into.
#[sabi_trait]
pub trait TokenSink {
    /// Hands `tokens` to the host, which timestamps them on arrival. Returns `false` once the
    /// host wants no more tokens; a variant must stop generating then.
    #[sabi(last_prefix_field)]
    fn emit(&mut self, tokens: RSlice<'_, u32>) -> bool;
}

/// The sink as a variant receives it.
pub type SinkRef<'a> = TokenSink_TO<'a, abi_stable::sabi_types::RMut<'a, ()>>;

/// The interface the host calls. Variant authors implement [`Engine`] instead.
#[sabi_trait]
pub trait Variant: Send {
    /// Greedy-decodes exactly `max_new_tokens` tokens after `prompt`, streaming them to `sink`
    /// (end-of-sequence does not stop it; the host decides what counts).
    fn generate(
        &mut self,
        prompt: RSlice<'_, u32>,
        max_new_tokens: u32,
        sink: SinkRef<'_>,
    ) -> RResult<(), RString>;

    /// Teacher-forced scoring of `tokens` from position `from` on: entry `i` describes the
    /// distribution after `tokens[..=from + i]`, evaluated at `tokens[from + i + 1]`, so there
    /// are `tokens.len() - 1 - from` entries (`from < tokens.len() - 1`; [`Engine`]s get this
    /// checked). Positions before `from` are only context: a variant need not compute their
    /// output layer.
    #[sabi(last_prefix_field)]
    fn score(
        &mut self,
        tokens: RSlice<'_, u32>,
        from: u32,
    ) -> RResult<RVec<ScoredPosition>, RString>;
}

/// A loaded variant, owned by the host.
pub type VariantBox = Variant_TO<'static, RBox<()>>;

/// Severity of a message sent through [`HostLog`].
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Detail for whoever debugs the variant (`--verbose` shows it).
    Debug,
    /// What the variant did (its configuration, its device).
    Info,
    /// Something the user should know about.
    Warn,
    /// A failure the variant reports before returning its error.
    Error,
}

/// The host's log callback, so a variant's messages land in the host's log.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct HostLog {
    /// The host function that records one message.
    pub write: extern "C" fn(level: LogLevel, message: RStr<'_>),
}

impl HostLog {
    /// Logs `message` at `level`.
    pub fn log(&self, level: LogLevel, message: &str) {
        (self.write)(level, RStr::from(message));
    }
    /// Logs a message for debugging.
    pub fn debug(&self, message: &str) {
        self.log(LogLevel::Debug, message);
    }
    /// Logs an informational message.
    pub fn info(&self, message: &str) {
        self.log(LogLevel::Info, message);
    }
    /// Logs a warning.
    pub fn warn(&self, message: &str) {
        self.log(LogLevel::Warn, message);
    }
}

/// The sink as an [`Engine`] sees it: a thin, safe wrapper over [`SinkRef`].
pub struct Sink<'a> {
    inner: SinkRef<'a>,
}

impl Sink<'_> {
    /// Streams `tokens` to the host. Returns `false` once the host wants no more.
    pub fn emit(&mut self, tokens: &[u32]) -> bool {
        self.inner.emit(RSlice::from_slice(tokens))
    }
}

/// What a variant author implements; [`export_variant!`] turns it into the ABI.
pub trait Engine: Send + Sized + 'static {
    /// Builds the engine over the host's model (the view lives for the whole process) with the
    /// host's load-time options. An engine must refuse a device it cannot compute on
    /// ([`LoadOptions::cpu_only`] does that for a CPU-only one) and should honour the thread
    /// count.
    fn load(model: &'static ModelView, log: HostLog, options: &LoadOptions)
        -> Result<Self, String>;
    /// See [`Variant::generate`].
    fn generate(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        sink: &mut Sink<'_>,
    ) -> Result<(), String>;
    /// See [`Variant::score`]; `from < tokens.len() - 1` is checked before this is called.
    fn score(&mut self, tokens: &[u32], from: usize) -> Result<Vec<ScoredPosition>, String>;
}

/// Runs `f`, turning a panic into an error that says where it happened.
fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> RResult<T, RString> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => ROk(value),
        Ok(Err(message)) => RErr(message.into()),
        Err(payload) => {
            let message = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "a panic with a non-string payload".to_string()
            };
            RErr(format!("variant panicked in {what}: {message}").into())
        }
    }
}

/// Adapts an [`Engine`] to the [`Variant`] interface, catching panics at the boundary.
struct Guarded<E>(E);

impl<E: Engine> Variant for Guarded<E> {
    fn generate(
        &mut self,
        prompt: RSlice<'_, u32>,
        max_new_tokens: u32,
        sink: SinkRef<'_>,
    ) -> RResult<(), RString> {
        let mut sink = Sink { inner: sink };
        guard("generate", || {
            self.0
                .generate(prompt.as_slice(), max_new_tokens as usize, &mut sink)
        })
    }

    fn score(
        &mut self,
        tokens: RSlice<'_, u32>,
        from: u32,
    ) -> RResult<RVec<ScoredPosition>, RString> {
        guard("score", || {
            let from = from as usize;
            if from + 1 >= tokens.len() {
                return Err(format!(
                    "cannot score a {}-token sequence from position {from}: nothing follows it",
                    tokens.len()
                ));
            }
            self.0.score(tokens.as_slice(), from).map(RVec::from)
        })
    }
}

extern "C" fn load_engine<E: Engine>(
    model: &'static ModelView,
    log: HostLog,
    options: &LoadOptions,
) -> RResult<VariantBox, RString> {
    guard("load", || {
        E::load(model, log, options)
            .map(|engine| Variant_TO::from_value(Guarded(engine), TD_Opaque))
    })
}

/// Builds the root module for engine `E`. Called by [`export_variant!`]; not for hosts.
#[doc(hidden)]
pub fn root_module_for<E: Engine>() -> VariantModRef {
    VariantMod {
        load: load_engine::<E>,
    }
    .leak_into_prefix()
}

/// Exports `$engine` (a type implementing [`Engine`]) as this cdylib's root module.
///
/// The variant crate must also depend on `abi_stable` (the attribute macro names it).
#[macro_export]
macro_rules! export_variant {
    ($engine:ty) => {
        #[$crate::abi_stable::export_root_module]
        pub fn autoinfer_root_module() -> $crate::VariantModRef {
            $crate::root_module_for::<$engine>()
        }
    };
}

#[cfg(test)]
mod tests {
    use super::{Device, LoadOptions};

    #[test]
    fn devices_parse_print_and_bad_values_are_named() {
        assert_eq!(LoadOptions::default().device(), Ok(Device::Cpu));
        for (text, device, printed) in [
            ("cpu", Device::Cpu, "cpu"),
            ("cuda", Device::Cuda(0), "cuda:0"),
            ("cuda:1", Device::Cuda(1), "cuda:1"),
            ("metal", Device::Metal(0), "metal:0"),
        ] {
            let parsed = LoadOptions::default()
                .with(LoadOptions::DEVICE, text)
                .device();
            assert_eq!(parsed, Ok(device));
            assert_eq!(device.to_string(), printed);
            assert_eq!(printed.parse::<Device>(), Ok(device), "round trip");
        }
        assert_eq!(LoadOptions::default().cpu_only("v"), Ok(()));
        let gpu = LoadOptions::default().with(LoadOptions::DEVICE, "cuda:1");
        let err = gpu.cpu_only("v").unwrap_err();
        assert!(err.contains("variant v") && err.contains("cuda:1"), "{err}");
        for bad in ["gpu", "cuda:x", "cuda:-1", "cpu:0", "CUDA", ""] {
            let err = LoadOptions::default()
                .with(LoadOptions::DEVICE, bad)
                .device()
                .unwrap_err();
            assert!(err.contains("device") && err.contains(bad), "{err}");
        }
    }

    #[test]
    fn threads_parse_and_bad_values_are_named() {
        assert_eq!(LoadOptions::default().threads(), Ok(None));
        let two = LoadOptions::default()
            .with(LoadOptions::THREADS, "3")
            .with("threads", "2");
        assert_eq!(
            two.threads(),
            Ok(Some(2)),
            "the later value replaces the earlier"
        );
        assert_eq!(two.entries.len(), 1);
        for bad in ["0", "-1", "two", ""] {
            let err = LoadOptions::default()
                .with(LoadOptions::THREADS, bad)
                .threads()
                .unwrap_err();
            assert!(err.contains("threads") && err.contains(bad), "{err}");
        }
        assert_eq!(two.get("device"), None);
    }
}
