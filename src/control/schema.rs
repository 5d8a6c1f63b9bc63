//! The control protocol's messages as serde types (reference with examples:
//! `docs/control-protocol.md`). One JSON object per line, QMP style:
//!
//! - VMM -> helper: `{"execute": NAME, "arguments": {...}, "id": ANY}`; file descriptors ride
//!   with SCM_RIGHTS on the same `sendmsg` as the line, named in order by `arguments.fds`;
//! - helper -> VMM: `{"return": {...}, "id": ANY}`, `{"error": {"class", "desc"}, "id": ANY}`,
//!   and events `{"event": NAME, "data": {...}, "timestamp": {"seconds", "microseconds"}}`.
//!
//! Argument structs refuse unknown fields, so a misspelt argument is an error, not a silent
//! default.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Version of this protocol; the greeting and `--print-capabilities` carry it.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every command (the order of `query-capabilities`' list).
pub const COMMANDS: [&str; 12] = [
    "query-capabilities",
    "add-device",
    "update-device",
    "set-limits",
    "migrate-outgoing",
    "migrate-incoming",
    "switchover-start",
    "load-config-ready",
    "query",
    "cancel",
    "quit",
    "remove-device",
];

/// Every event.
pub const EVENTS: [&str; 6] = [
    "MIGRATION",
    "SWITCHOVER_ACK",
    "INITIAL_DATA_SENT",
    "INITIAL_DATA_LOADED",
    "DEVICE_LOADED",
    "MIGRATION_FAILED",
];

/// QMP's error classes that this protocol uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotFound,
}

/// `{"class": ..., "desc": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub class: ErrorClass,
    pub desc: String,
}

/// A command line as it arrives (before its arguments are typed).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub execute: String,
    #[serde(default)]
    pub arguments: Option<Value>,
    #[serde(default)]
    pub id: Option<Value>,
}

/// The reply to one command.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Return {
        #[serde(rename = "return")]
        ret: Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    Error {
        error: ErrorBody,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
}

/// The first line on a new connection.
#[derive(Debug, Serialize, Deserialize)]
pub struct Greeting {
    #[serde(rename = "vfio-multifd")]
    pub vfio_multifd: GreetingBody,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GreetingBody {
    pub version: String,
    pub protocol: u32,
}

/// QMP's event timestamp (wall clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: u64,
    pub microseconds: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
        }
    }
}

/// An event line.
#[derive(Debug, Serialize, Deserialize)]
pub struct EventLine {
    pub event: String,
    pub data: Value,
    pub timestamp: Timestamp,
}

/// QEMU's OnOffAuto.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOffAuto {
    On,
    Off,
    #[default]
    Auto,
}

/// How the helper gets at a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceMode {
    /// A VFIO device fd: the helper drives the migration states itself.
    Device,
    /// Only the device's migration data_fd: the VMM drives the states.
    DataFd,
}

/// Who owns a device passed in `device` mode (only the owner may reset it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerArg {
    Helper,
    #[default]
    Vmm,
}

/// A byte count or `"unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Limit {
    Bytes(u64),
    Word(LimitWord),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitWord {
    Unlimited,
}

impl Limit {
    pub fn bytes(self) -> u64 {
        match self {
            Limit::Bytes(n) => n,
            Limit::Word(LimitWord::Unlimited) => u64::MAX,
        }
    }
}

/// `add-device`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AddDevice {
    /// The VMM's handle for the device in later commands and events [default:
    /// `IDSTR/INSTANCE-ID`]; 1 to [`MAX_ID_BYTES`] bytes.
    #[serde(default)]
    pub id: Option<String>,
    /// QEMU's SaveStateEntry idstr (e.g. `0000:00:02.0/vfio`); 1 to 255 bytes, no NUL.
    pub idstr: String,
    #[serde(default)]
    pub instance_id: u32,
    pub mode: DeviceMode,
    /// `device` mode only.
    #[serde(default)]
    pub owner: Option<OwnerArg>,
    /// Source: send precopy data before switchover (`data-fd` mode: the passed data_fd is in
    /// PRE_COPY; `device` mode: the helper moves the device to PRE_COPY).
    #[serde(default)]
    pub precopy: bool,
    /// Source: the device's config blob (base64), sent last with the CONFIG flag; may also
    /// come with `update-device` before `switchover-start`.
    #[serde(default)]
    pub config: Option<String>,
    #[serde(default)]
    pub multifd_transfer: OnOffAuto,
    /// Destination: hold the device's config until `load-config-ready`.
    #[serde(default)]
    pub load_config_after_iter: OnOffAuto,
    /// Destination: QEMU 10.1 `x-migration-max-queued-buffers-size` for this device.
    #[serde(default)]
    pub max_queued_buffers_size: Option<Limit>,
    #[serde(default)]
    pub fds: Vec<String>,
}

/// The longest `add-device` `id`: as long as an idstr may be, so that what the helper keeps
/// (and repeats in every event) per device stays small.
pub const MAX_ID_BYTES: usize = 255;

/// `update-device`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UpdateDevice {
    pub device: String,
    #[serde(default)]
    pub config: Option<String>,
    #[serde(default)]
    pub fds: Vec<String>,
}

/// `remove-device`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RemoveDevice {
    pub device: String,
}

/// `set-limits`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SetLimits {
    /// One device, or every device (present and later) when absent.
    #[serde(default)]
    pub device: Option<String>,
    pub max_queued_buffers_size: Limit,
}

/// `migrate-outgoing`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MigrateOutgoing {
    pub channels: u8,
    #[serde(default)]
    pub uuid: Option<String>,
    /// `HOST:PORT` of the destination helper; or pass sockets (`fds`).
    #[serde(default)]
    pub connect: Option<String>,
    #[serde(default)]
    pub fds: Vec<String>,
    #[serde(default)]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub multifd_compression: Option<String>,
    #[serde(default)]
    pub mapped_ram: Option<bool>,
    #[serde(default)]
    pub send_switchover_start: Option<bool>,
}

/// `migrate-incoming`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MigrateIncoming {
    pub channels: u8,
    #[serde(default)]
    pub uuid: Option<String>,
    /// `HOST:PORT` to listen on (port 0 picks one; the reply says which); or pass sockets.
    #[serde(default)]
    pub listen: Option<String>,
    #[serde(default)]
    pub fds: Vec<String>,
    #[serde(default)]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub multifd_compression: Option<String>,
    #[serde(default)]
    pub mapped_ram: Option<bool>,
    #[serde(default)]
    pub send_switchover_start: Option<bool>,
}

/// The migration settings that mirror QEMU's and decide whether multifd device transfer is
/// supported (QEMU's `vfio_multifd_transfer_supported`: no compression, no mapped-ram,
/// send-switchover-start on). Returns why not, when not.
pub fn multifd_unsupported(
    compression: Option<&str>,
    mapped_ram: Option<bool>,
    send_switchover_start: Option<bool>,
) -> Option<String> {
    let compression = compression.unwrap_or("none");
    if compression != "none" {
        return Some(format!(
            "multifd-compression is {compression} (device state moves uncompressed)"
        ));
    }
    if mapped_ram == Some(true) {
        return Some("mapped-ram is on".into());
    }
    if send_switchover_start == Some(false) {
        return Some("send-switchover-start is off".into());
    }
    None
}

/// `load-config-ready`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LoadConfigReady {
    /// One device, or all when absent.
    #[serde(default)]
    pub device: Option<String>,
}

/// `query`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Query {
    /// Per-packet CLOCK_MONOTONIC timestamps per device (after the engine's end).
    #[serde(default)]
    pub timestamps: bool,
}

/// Commands without arguments.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArguments {}

/// Standard base64 (RFC 4648, with padding), for config blobs in JSON.
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional, no whitespace); `None` on anything else.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.trim_end_matches('=').as_bytes();
    if text.len() - bytes.len() > 2 || bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3 + 2);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_rfc4648() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), coded);
            assert_eq!(base64_decode(coded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        assert!(base64_decode("Zm9v!").is_none());
        assert!(base64_decode("Z").is_none());
        assert!(base64_decode("Zg===").is_none());
    }

    #[test]
    fn arguments_refuse_unknown_fields_and_take_kebab_case() {
        let add: AddDevice = serde_json::from_value(serde_json::json!({
            "idstr": "0000:00:02.0/vfio", "mode": "data-fd", "fds": ["data-fd"],
            "max-queued-buffers-size": "unlimited", "load-config-after-iter": "on"
        }))
        .unwrap();
        assert_eq!(add.mode, DeviceMode::DataFd);
        assert_eq!(add.max_queued_buffers_size.unwrap().bytes(), u64::MAX);
        assert_eq!(add.load_config_after_iter, OnOffAuto::On);
        let err = serde_json::from_value::<AddDevice>(serde_json::json!({
            "idstr": "x", "mode": "data-fd", "instanceid": 1
        }))
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let limits: SetLimits =
            serde_json::from_value(serde_json::json!({"max-queued-buffers-size": 4096})).unwrap();
        assert_eq!(limits.max_queued_buffers_size.bytes(), 4096);
    }

    #[test]
    fn replies_are_qmp_shaped() {
        let ok = Reply::Return {
            ret: serde_json::json!({}),
            id: Some(serde_json::json!(7)),
        };
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"return":{},"id":7}"#
        );
        let err = Reply::Error {
            error: ErrorBody {
                class: ErrorClass::GenericError,
                desc: "no".into(),
            },
            id: None,
        };
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"error":{"class":"GenericError","desc":"no"}}"#
        );
    }
}
