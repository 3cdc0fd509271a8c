//! The forms a value takes beyond serde's own: the names of modes, durations in human
//! form (`"30s"`), and `"off"` for a setting that can be turned off.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use redrive_core::{Execution, LeaseKeeping, OrderingMode};
use redrive_middleware::retry::Jitter;
use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, DeserializeOwned, Deserializer, IntoDeserializer, MapAccess, Visitor};

/// `execution`: `"spawned"` or `"in_task"`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ExecutionName {
    Spawned,
    InTask,
}

impl From<ExecutionName> for Execution {
    fn from(e: ExecutionName) -> Self {
        match e {
            ExecutionName::Spawned => Execution::Spawned,
            ExecutionName::InTask => Execution::InTask,
        }
    }
}

/// `ordering`: `"unordered"`, `"per_key"` or `"per_partition"`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum OrderingName {
    Unordered,
    PerKey,
    PerPartition,
}

impl From<OrderingName> for OrderingMode {
    fn from(o: OrderingName) -> Self {
        match o {
            OrderingName::Unordered => OrderingMode::Unordered,
            OrderingName::PerKey => OrderingMode::PerKey,
            OrderingName::PerPartition => OrderingMode::PerPartition,
        }
    }
}

/// `lease_keeping`: `"auto"`, `"off"` or an interval such as `"10s"`.
#[derive(Clone, Copy, Debug)]
pub(super) struct LeaseKeepingSetting(pub(super) LeaseKeeping);

impl<'de> Deserialize<'de> for LeaseKeepingSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = LeaseKeepingSetting;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`auto`, `off` or an interval such as \"10s\"")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(LeaseKeepingSetting(match s {
                    "auto" => LeaseKeeping::Auto,
                    "off" => LeaseKeeping::Off,
                    _ => LeaseKeeping::Every(
                        humantime::parse_duration(s)
                            .map_err(|_| E::invalid_value(de::Unexpected::Str(s), &self))?,
                    ),
                }))
            }
        }
        d.deserialize_any(V)
    }
}

/// `jitter`: `"none"`, `"full"`, `"equal"`, `"decorrelated"`, or a ratio from 0.0 to
/// 1.0 (proportional).
#[derive(Clone, Copy, Debug)]
pub(super) struct JitterSetting(pub(super) Jitter);

impl<'de> Deserialize<'de> for JitterSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = JitterSetting;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`none`, `full`, `equal`, `decorrelated` or a ratio from 0.0 to 1.0")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(JitterSetting(match s {
                    "none" => Jitter::None,
                    "full" => Jitter::Full,
                    "equal" => Jitter::Equal,
                    "decorrelated" => Jitter::Decorrelated,
                    _ => return Err(E::invalid_value(de::Unexpected::Str(s), &self)),
                }))
            }

            fn visit_f64<E: de::Error>(self, r: f64) -> Result<Self::Value, E> {
                Ok(JitterSetting(Jitter::Proportional(r)))
            }

            fn visit_u64<E: de::Error>(self, r: u64) -> Result<Self::Value, E> {
                // 0 or 1 (others are refused when the layer is built), exactly.
                #[allow(clippy::cast_precision_loss, reason = "a ratio of 0 or 1")]
                Ok(JitterSetting(Jitter::Proportional(r as f64)))
            }

            fn visit_i64<E: de::Error>(self, r: i64) -> Result<Self::Value, E> {
                #[allow(clippy::cast_precision_loss, reason = "refused below 0 anyway")]
                Ok(JitterSetting(Jitter::Proportional(r as f64)))
            }
        }
        d.deserialize_any(V)
    }
}

/// `unkeyed`: `"process"` or `"reject"`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum UnkeyedName {
    Process,
    Reject,
}

/// `commit_mode`: `"layer"` or `"handler"`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum CommitModeName {
    Layer,
    Handler,
}

/// A duration in human form (`"30s"`, `"250ms"`, `"5m"`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Human(pub(super) Duration);

impl<'de> Deserialize<'de> for Human {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        humantime_serde::deserialize(d).map(Human)
    }
}

impl Described for Human {
    const WHAT: &'static str = "a duration such as \"30s\"";
}

impl Described for u32 {
    const WHAT: &'static str = "a whole number";
}

/// What a value of an [`OrOff`] is, for its error messages.
pub(super) trait Described {
    const WHAT: &'static str;
}

/// A setting that is a value, or the word `"off"` to turn what it sets off.
#[derive(Clone, Copy, Debug)]
pub(super) enum OrOff<T> {
    Off,
    On(T),
}

impl<'de, T: DeserializeOwned + Described> Deserialize<'de> for OrOff<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: DeserializeOwned + Described> Visitor<'de> for V<T> {
            type Value = OrOff<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "`off` or {}", T::WHAT)
            }

            // A value `T` refuses is reported as one this setting refuses: `off` or `T`.
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                if s == "off" {
                    return Ok(OrOff::Off);
                }
                T::deserialize(s.into_deserializer())
                    .map(OrOff::On)
                    .map_err(|_: E| E::invalid_value(de::Unexpected::Str(s), &self))
            }

            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
                T::deserialize(n.into_deserializer())
                    .map(OrOff::On)
                    .map_err(|_: E| E::invalid_value(de::Unexpected::Unsigned(n), &self))
            }

            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
                T::deserialize(n.into_deserializer())
                    .map(OrOff::On)
                    .map_err(|_: E| E::invalid_value(de::Unexpected::Signed(n), &self))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(OrOff::On)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}
