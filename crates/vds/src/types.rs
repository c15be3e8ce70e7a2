//! The VDS vocabulary with exact values: path ids, statuses, interconnect types, load-balance policies,
//! HBA port properties, WWNs, IP addresses, GUIDs.
//!
//! Every VDS enum is *open* on input: [`TryFrom<i32>`] rejects a value this crate does not know with
//! `E_INVALIDARG` (never a panic), `as i32` gives the exact VDS value back, and `vds_name()` gives the
//! SDK constant's name for the `…Name` fields of the management interface.

use crate::hresult::VdsError;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Defines a closed Rust enum over an open VDS `int` enum: exact discriminants, `TryFrom<i32>`,
/// `vds_name()`, `ALL`.
macro_rules! vds_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $what:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $vds:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
        #[repr(i32)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $value, )+
        }

        impl $name {
            /// Every value, in numeric order.
            pub const ALL: &'static [$name] = &[ $( $name::$variant, )+ ];

            /// The SDK constant's name, e.g. `VDS_MPS_ONLINE`.
            pub const fn vds_name(self) -> &'static str {
                match self { $( $name::$variant => $vds, )+ }
            }

            /// The VDS name back to the value (exact, case-sensitive).
            pub fn from_vds_name(name: &str) -> Option<$name> {
                match name { $( $vds => Some($name::$variant), )+ _ => None }
            }
        }

        impl TryFrom<i32> for $name {
            type Error = VdsError;
            fn try_from(value: i32) -> Result<$name, VdsError> {
                match value {
                    $( $value => Ok($name::$variant), )+
                    _ => Err(VdsError::invalid_arg(format!(concat!("{} is not a valid ", $what), value))),
                }
            }
        }

        impl From<$name> for i32 {
            fn from(value: $name) -> i32 {
                value as i32
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.vds_name())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_i32(*self as i32)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<$name, D::Error> {
                let value = i32::deserialize(deserializer)?;
                $name::try_from(value).map_err(serde::de::Error::custom)
            }
        }
    };
}

vds_enum! {
    /// `VDS_PATH_STATUS`. Note the sparse values.
    PathStatus, "VDS_PATH_STATUS" {
        Unknown = 0 => "VDS_MPS_UNKNOWN",
        Online = 1 => "VDS_MPS_ONLINE",
        Failed = 5 => "VDS_MPS_FAILED",
        Standby = 7 => "VDS_MPS_STANDBY",
    }
}

vds_enum! {
    /// `VDS_HWPROVIDER_TYPE`: the interconnect of a path. `Hybrid` is a provider type only: never valid
    /// on a path ([`HwProviderType::is_valid_on_path`]).
    HwProviderType, "VDS_HWPROVIDER_TYPE" {
        Unknown = 0 => "VDS_HWT_UNKNOWN",
        PciRaid = 1 => "VDS_HWT_PCI_RAID",
        FibreChannel = 2 => "VDS_HWT_FIBRE_CHANNEL",
        Iscsi = 3 => "VDS_HWT_ISCSI",
        Sas = 4 => "VDS_HWT_SAS",
        Hybrid = 5 => "VDS_HWT_HYBRID",
    }
}

impl HwProviderType {
    /// `VDS_PATH_INFO.type` may be anything but `VDS_HWT_HYBRID`.
    pub const fn is_valid_on_path(self) -> bool {
        !matches!(self, HwProviderType::Hybrid)
    }
}

vds_enum! {
    /// `VDS_LOADBALANCE_POLICY_ENUM`. `VDS_LBP_UNKNOWN` (0) is never a valid input, so it is not a variant:
    /// `LoadBalancePolicy::try_from(0)` is `E_INVALIDARG`.
    LoadBalancePolicy, "VDS_LOADBALANCE_POLICY_ENUM" {
        Failover = 1 => "VDS_LBP_FAILOVER",
        RoundRobin = 2 => "VDS_LBP_ROUND_ROBIN",
        RoundRobinWithSubset = 3 => "VDS_LBP_ROUND_ROBIN_WITH_SUBSET",
        DynLeastQueueDepth = 4 => "VDS_LBP_DYN_LEAST_QUEUE_DEPTH",
        WeightedPaths = 5 => "VDS_LBP_WEIGHTED_PATHS",
        LeastBlocks = 6 => "VDS_LBP_LEAST_BLOCKS",
        /// lunmpio's `service-time`.
        VendorSpecific = 7 => "VDS_LBP_VENDOR_SPECIFIC",
    }
}

impl LoadBalancePolicy {
    /// The name used in the config file and on the command line.
    pub const fn config_name(self) -> &'static str {
        match self {
            LoadBalancePolicy::Failover => "failover",
            LoadBalancePolicy::RoundRobin => "round-robin",
            LoadBalancePolicy::RoundRobinWithSubset => "round-robin-with-subset",
            LoadBalancePolicy::DynLeastQueueDepth => "least-queue-depth",
            LoadBalancePolicy::WeightedPaths => "weighted-paths",
            LoadBalancePolicy::LeastBlocks => "least-blocks",
            LoadBalancePolicy::VendorSpecific => "service-time",
        }
    }

    /// The config name back to the value (exact, lower case).
    pub fn from_config_name(name: &str) -> Option<LoadBalancePolicy> {
        LoadBalancePolicy::ALL
            .iter()
            .copied()
            .find(|p| p.config_name() == name)
    }

    /// Accepts the config name (`round-robin`), the VDS name (`VDS_LBP_ROUND_ROBIN`) or a decimal number
    /// (`2`). Anything else, including `0`, is `E_INVALIDARG`.
    ///
    /// ```
    /// use lunmpio_vds::LoadBalancePolicy;
    /// assert_eq!(LoadBalancePolicy::parse_any("service-time").unwrap(), LoadBalancePolicy::VendorSpecific);
    /// assert_eq!(LoadBalancePolicy::parse_any("VDS_LBP_ROUND_ROBIN").unwrap(), LoadBalancePolicy::RoundRobin);
    /// assert_eq!(LoadBalancePolicy::parse_any("4").unwrap(), LoadBalancePolicy::DynLeastQueueDepth);
    /// assert!(LoadBalancePolicy::parse_any("0").is_err());
    /// ```
    pub fn parse_any(text: &str) -> Result<LoadBalancePolicy, VdsError> {
        let text = text.trim();
        if let Some(policy) = LoadBalancePolicy::from_config_name(text) {
            return Ok(policy);
        }
        if let Some(policy) = LoadBalancePolicy::from_vds_name(text) {
            return Ok(policy);
        }
        match text.parse::<i32>() {
            Ok(value) => LoadBalancePolicy::try_from(value),
            Err(_) => Err(VdsError::invalid_arg(format!(
                "unknown load-balance policy {text:?} (expected a name such as \"round-robin\", \
                 a VDS name such as \"VDS_LBP_ROUND_ROBIN\", or a number 1-7)"
            ))),
        }
    }

    /// This policy's bit in `VDS_PROVIDER_LBSUPPORT_FLAG`: `1 << (policy - 1)`.
    pub const fn support_flag(self) -> LbSupportFlags {
        LbSupportFlags(1 << (self as u32 - 1))
    }

    /// Whether the policy has a primary/standby split (Failover and Round Robin with Subset).
    pub const fn uses_primary(self) -> bool {
        matches!(
            self,
            LoadBalancePolicy::Failover | LoadBalancePolicy::RoundRobinWithSubset
        )
    }
}

/// `VDS_PROVIDER_LBSUPPORT_FLAG` mask: bit = `1 << (policy − 1)`.
///
/// ```
/// use lunmpio_vds::{LbSupportFlags, LoadBalancePolicy};
/// assert_eq!(LbSupportFlags::ALL.0, 0x7f);
/// assert!(LbSupportFlags::FAILOVER.contains(LoadBalancePolicy::Failover));
/// assert!(!LbSupportFlags::FAILOVER.contains(LoadBalancePolicy::RoundRobin));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LbSupportFlags(pub u32);

impl LbSupportFlags {
    pub const FAILOVER: LbSupportFlags = LbSupportFlags(0x01);
    pub const ROUND_ROBIN: LbSupportFlags = LbSupportFlags(0x02);
    pub const ROUND_ROBIN_WITH_SUBSET: LbSupportFlags = LbSupportFlags(0x04);
    pub const DYN_LEAST_QUEUE_DEPTH: LbSupportFlags = LbSupportFlags(0x08);
    pub const WEIGHTED_PATHS: LbSupportFlags = LbSupportFlags(0x10);
    pub const LEAST_BLOCKS: LbSupportFlags = LbSupportFlags(0x20);
    pub const VENDOR_SPECIFIC: LbSupportFlags = LbSupportFlags(0x40);
    /// All seven policies.
    pub const ALL: LbSupportFlags = LbSupportFlags(0x7f);

    pub const fn contains(self, policy: LoadBalancePolicy) -> bool {
        self.0 & policy.support_flag().0 != 0
    }

    /// The supported policies, in numeric order (unknown bits are ignored).
    pub fn policies(self) -> impl Iterator<Item = LoadBalancePolicy> {
        LoadBalancePolicy::ALL
            .iter()
            .copied()
            .filter(move |p| self.contains(*p))
    }
}

vds_enum! {
    /// `VDS_HBAPORT_TYPE` (mirrors the HBA API; starts at 1, 4 is unassigned).
    HbaPortType, "VDS_HBAPORT_TYPE" {
        Unknown = 1 => "VDS_HPT_UNKNOWN",
        Other = 2 => "VDS_HPT_OTHER",
        NotPresent = 3 => "VDS_HPT_NOTPRESENT",
        NPort = 5 => "VDS_HPT_NPORT",
        NlPort = 6 => "VDS_HPT_NLPORT",
        FlPort = 7 => "VDS_HPT_FLPORT",
        FPort = 8 => "VDS_HPT_FPORT",
        EPort = 9 => "VDS_HPT_EPORT",
        GPort = 10 => "VDS_HPT_GPORT",
        LPort = 20 => "VDS_HPT_LPORT",
        Ptp = 21 => "VDS_HPT_PTP",
    }
}

vds_enum! {
    /// `VDS_HBAPORT_STATUS` (mirrors the HBA API; 1–8).
    HbaPortStatus, "VDS_HBAPORT_STATUS" {
        Unknown = 1 => "VDS_HPS_UNKNOWN",
        Online = 2 => "VDS_HPS_ONLINE",
        Offline = 3 => "VDS_HPS_OFFLINE",
        Bypassed = 4 => "VDS_HPS_BYPASSED",
        Diagnostics = 5 => "VDS_HPS_DIAGNOSTICS",
        LinkDown = 6 => "VDS_HPS_LINKDOWN",
        Error = 7 => "VDS_HPS_ERROR",
        Loopback = 8 => "VDS_HPS_LOOPBACK",
    }
}

vds_enum! {
    /// `VDS_IPADDRESS_TYPE`.
    IpAddressType, "VDS_IPADDRESS_TYPE" {
        Text = 0 => "VDS_IPT_TEXT",
        Ipv4 = 1 => "VDS_IPT_IPV4",
        Ipv6 = 2 => "VDS_IPT_IPV6",
        Empty = 3 => "VDS_IPT_EMPTY",
    }
}

/// `VDS_HBAPORT_SPEED_FLAG`: one flag for the current speed (`ulPortSpeed`), a mask for the supported
/// speeds (`ulSupportedPortSpeed`). Note 10 Gbit/s (0x4) comes before 4 Gbit/s (0x8).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HbaPortSpeedFlags(pub u32);

impl HbaPortSpeedFlags {
    pub const UNKNOWN: HbaPortSpeedFlags = HbaPortSpeedFlags(0x0000);
    pub const GBIT_1: HbaPortSpeedFlags = HbaPortSpeedFlags(0x0001);
    pub const GBIT_2: HbaPortSpeedFlags = HbaPortSpeedFlags(0x0002);
    pub const GBIT_10: HbaPortSpeedFlags = HbaPortSpeedFlags(0x0004);
    pub const GBIT_4: HbaPortSpeedFlags = HbaPortSpeedFlags(0x0008);
    pub const NOT_NEGOTIATED: HbaPortSpeedFlags = HbaPortSpeedFlags(0x8000);

    const NAMED: [(HbaPortSpeedFlags, &'static str); 5] = [
        (HbaPortSpeedFlags::GBIT_1, "VDS_HSF_1GBIT"),
        (HbaPortSpeedFlags::GBIT_2, "VDS_HSF_2GBIT"),
        (HbaPortSpeedFlags::GBIT_10, "VDS_HSF_10GBIT"),
        (HbaPortSpeedFlags::GBIT_4, "VDS_HSF_4GBIT"),
        (HbaPortSpeedFlags::NOT_NEGOTIATED, "VDS_HSF_NOT_NEGOTIATED"),
    ];

    pub const fn contains(self, other: HbaPortSpeedFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The VDS names of the set bits (`["VDS_HSF_UNKNOWN"]` for 0); bits without a name are left out.
    pub fn vds_names(self) -> Vec<&'static str> {
        if self.0 == 0 {
            return vec!["VDS_HSF_UNKNOWN"];
        }
        HbaPortSpeedFlags::NAMED
            .iter()
            .filter(|(flag, _)| self.contains(*flag))
            .map(|(_, name)| *name)
            .collect()
    }
}

/// Formats a 64-bit id the way the management interface does: `"0x"` + 16 lower-case hex digits.
pub fn format_id64(value: u64) -> String {
    format!("0x{value:016x}")
}

/// Parses a 64-bit id: `"0x"` + 1–16 hex digits, or a decimal number.
pub fn parse_id64(text: &str) -> Result<u64, VdsError> {
    let text = text.trim();
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.len() <= 16 => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None => text.parse::<u64>().ok(),
    };
    parsed.ok_or_else(|| {
        VdsError::invalid_arg(format!(
            "{text:?} is not a 64-bit id (\"0x\" + hex digits, or decimal)"
        ))
    })
}

/// Serde helpers for a `u64` id as `"0x…"` (accepting a JSON number or a decimal string on input):
/// `#[serde(with = "lunmpio_vds::types::id64")]`.
pub mod id64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_id64(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Id {
            Number(u64),
            Text(String),
        }
        match Id::deserialize(deserializer)? {
            Id::Number(value) => Ok(value),
            Id::Text(text) => super::parse_id64(&text).map_err(serde::de::Error::custom),
        }
    }
}

/// `VDS_PATH_ID`: the LUN's source id and the path's id. Ordered by (source id, path id), which is the
/// order in which GetPathInfo and GetLoadBalancePolicy list paths.
///
/// JSON: `{"sourceId": "0x…", "pathId": "0x…"}` (numbers accepted on input).
///
/// ```
/// use lunmpio_vds::PathId;
/// let id = PathId::new(1, 2);
/// assert_eq!(serde_json::to_string(&id).unwrap(),
///            r#"{"sourceId":"0x0000000000000001","pathId":"0x0000000000000002"}"#);
/// let back: PathId = serde_json::from_str(r#"{"sourceId": 1, "pathId": "0x2"}"#).unwrap();
/// assert_eq!(back, id);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathId {
    #[serde(with = "id64")]
    pub source_id: u64,
    #[serde(with = "id64")]
    pub path_id: u64,
}

impl PathId {
    pub const fn new(source_id: u64, path_id: u64) -> PathId {
        PathId { source_id, path_id }
    }
}

impl fmt::Display for PathId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            format_id64(self.source_id),
            format_id64(self.path_id)
        )
    }
}

/// `VDS_PATH_POLICY`: one path's primary flag and weight (lower weight = preferred).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathPolicy {
    pub path_id: PathId,
    pub primary: bool,
    pub weight: u32,
}

/// `VDS_WWN`: an 8-byte World Wide Name, element 0 most significant.
///
/// Parses `"20:00:00:25:b5:00:00:0a"` (also with `-`), `"0x20000025b500000a"` and 16 bare hex digits;
/// displays the colon form in lower case.
///
/// ```
/// use lunmpio_vds::Wwn;
/// let wwn: Wwn = "20:00:00:25:B5:00:00:0A".parse().unwrap();
/// assert_eq!(wwn.to_string(), "20:00:00:25:b5:00:00:0a");
/// assert_eq!(wwn, "0x20000025b500000a".parse().unwrap());
/// assert_eq!(wwn.to_u64(), 0x2000_0025_b500_000a);
/// assert!("20:00".parse::<Wwn>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Default)]
pub struct Wwn(pub [u8; 8]);

impl Wwn {
    pub const fn from_u64(value: u64) -> Wwn {
        Wwn(value.to_be_bytes())
    }

    pub const fn to_u64(self) -> u64 {
        u64::from_be_bytes(self.0)
    }
}

impl FromStr for Wwn {
    type Err = VdsError;

    fn from_str(text: &str) -> Result<Wwn, VdsError> {
        let bad = || {
            VdsError::invalid_arg(format!(
                "{text:?} is not a WWN (\"20:00:00:25:b5:00:00:0a\", or 16 hex digits)"
            ))
        };
        let trimmed = text.trim();
        let separated = trimmed.contains(':') || trimmed.contains('-');
        let mut bytes = [0u8; 8];
        if separated {
            let parts: Vec<&str> = trimmed.split([':', '-']).collect();
            if parts.len() != 8 {
                return Err(bad());
            }
            for (byte, part) in bytes.iter_mut().zip(parts) {
                if part.len() != 2 {
                    return Err(bad());
                }
                *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
            }
        } else {
            let hex = trimmed
                .strip_prefix("0x")
                .or_else(|| trimmed.strip_prefix("0X"))
                .unwrap_or(trimmed);
            if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            bytes = u64::from_str_radix(hex, 16)
                .map_err(|_| bad())?
                .to_be_bytes();
        }
        Ok(Wwn(bytes))
    }
}

impl fmt::Display for Wwn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for Wwn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Wwn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Wwn, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// `VDS_OBJECT_ID`: a GUID. lunmpio derives stable ones (v5, name-based) from addresses, so a target
/// portal or controller port keeps its id across restarts.
///
/// ```
/// use lunmpio_vds::Guid;
/// let a = Guid::derive("target-portal", "10.0.1.10:10809");
/// assert_eq!(a, Guid::derive("target-portal", "10.0.1.10:10809"));
/// assert_ne!(a, Guid::derive("controller-port", "10.0.1.10:10809"));
/// assert_ne!(a, Guid::NIL);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Default)]
pub struct Guid(pub uuid::Uuid);

impl Guid {
    /// `GUID_NULL`: "not known" (for example an HBA port the service cannot match).
    pub const NIL: Guid = Guid(uuid::Uuid::nil());

    /// lunmpio's v5 namespace. Fixed forever: changing it changes every derived id.
    pub const NAMESPACE: uuid::Uuid =
        uuid::Uuid::from_u128(0x6c75_6e6d_7069_4f00_8000_7664_735f_6964);

    /// A stable id for an object of `kind` (e.g. `"target-portal"`, `"initiator-adapter"`,
    /// `"controller-port"`, `"hba-port"`) named by `key` (e.g. an address or a WWN).
    pub fn derive(kind: &str, key: &str) -> Guid {
        let mut name = Vec::with_capacity(kind.len() + 1 + key.len());
        name.extend_from_slice(kind.as_bytes());
        // A separator that cannot occur in either part keeps ("a", "bc") and ("ab", "c") apart.
        name.push(0);
        name.extend_from_slice(key.as_bytes());
        Guid(uuid::Uuid::new_v5(&Guid::NAMESPACE, &name))
    }

    pub fn is_nil(self) -> bool {
        self.0.is_nil()
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

impl FromStr for Guid {
    type Err = VdsError;

    /// Hyphenated, braced (`{…}`) or simple (32 hex digits) form.
    fn from_str(text: &str) -> Result<Guid, VdsError> {
        uuid::Uuid::parse_str(text.trim())
            .map(Guid)
            .map_err(|e| VdsError::invalid_arg(format!("{text:?} is not a GUID: {e}")))
    }
}

impl Serialize for Guid {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Guid {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Guid, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// `VDS_HBAPORT_PROP`: the local (initiator) end of an HBA-based path.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HbaPortProp {
    /// Filled by the service; `Guid::NIL` when unknown.
    pub id: Guid,
    pub wwn_node: Wwn,
    pub wwn_port: Wwn,
    #[serde(rename = "type")]
    pub port_type: HbaPortType,
    pub status: HbaPortStatus,
    pub port_speed: HbaPortSpeedFlags,
    pub supported_port_speed: HbaPortSpeedFlags,
}

/// The longest text address, in UTF-16 units, that fits `wszTextAddress[257]` with its NUL.
pub const IP_TEXT_ADDRESS_UTF16_MAX: usize = 256;

/// The address part of a `VDS_IPADDRESS`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum IpValue {
    /// A DNS name or an address in text form.
    Text(String),
    /// The *numeric value* of the IPv4 address, `u32::from(Ipv4Addr)`: octet 0 in bits 24–31 (research Q12).
    Ipv4(u32),
    Ipv6 {
        octets: [u8; 16],
        flow_info: u32,
        scope_id: u32,
    },
    Empty,
}

/// `VDS_IPADDRESS`: an initiator portal address and TCP port.
///
/// ```
/// use lunmpio_vds::{IpAddress, IpAddressType};
/// use std::net::{IpAddr, Ipv4Addr};
/// let a = IpAddress::from_ip(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 5)), 0);
/// assert_eq!(a.address_type(), IpAddressType::Ipv4);
/// assert_eq!(a.to_ip(), Some(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 5))));
/// assert_eq!(a.address_text(), "10.0.2.5");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct IpAddress {
    pub value: IpValue,
    pub port: u32,
}

impl IpAddress {
    pub const EMPTY: IpAddress = IpAddress {
        value: IpValue::Empty,
        port: 0,
    };

    pub fn from_ip(ip: IpAddr, port: u32) -> IpAddress {
        let value = match ip {
            IpAddr::V4(v4) => IpValue::Ipv4(u32::from(v4)),
            IpAddr::V6(v6) => IpValue::Ipv6 {
                octets: v6.octets(),
                flow_info: 0,
                scope_id: 0,
            },
        };
        IpAddress { value, port }
    }

    pub fn from_socket_addr(addr: SocketAddr) -> IpAddress {
        match addr {
            SocketAddr::V4(v4) => IpAddress::from_ip(IpAddr::V4(*v4.ip()), u32::from(v4.port())),
            SocketAddr::V6(v6) => IpAddress {
                value: IpValue::Ipv6 {
                    octets: v6.ip().octets(),
                    flow_info: v6.flowinfo(),
                    scope_id: v6.scope_id(),
                },
                port: u32::from(v6.port()),
            },
        }
    }

    /// A text address (DNS name); `E_INVALIDARG` if it does not fit `wszTextAddress`.
    pub fn text(text: &str, port: u32) -> Result<IpAddress, VdsError> {
        let units = text.encode_utf16().count();
        if units > IP_TEXT_ADDRESS_UTF16_MAX {
            return Err(VdsError::invalid_arg(format!(
                "text address is {units} UTF-16 units, more than {IP_TEXT_ADDRESS_UTF16_MAX}"
            )));
        }
        Ok(IpAddress {
            value: IpValue::Text(text.to_owned()),
            port,
        })
    }

    pub fn address_type(&self) -> IpAddressType {
        match self.value {
            IpValue::Text(_) => IpAddressType::Text,
            IpValue::Ipv4(_) => IpAddressType::Ipv4,
            IpValue::Ipv6 { .. } => IpAddressType::Ipv6,
            IpValue::Empty => IpAddressType::Empty,
        }
    }

    /// The address as an [`IpAddr`], if it is one (a text address is parsed; a DNS name is not resolved).
    pub fn to_ip(&self) -> Option<IpAddr> {
        match &self.value {
            IpValue::Text(text) => text.parse().ok(),
            IpValue::Ipv4(value) => Some(IpAddr::V4(Ipv4Addr::from(*value))),
            IpValue::Ipv6 { octets, .. } => Some(IpAddr::V6(Ipv6Addr::from(*octets))),
            IpValue::Empty => None,
        }
    }

    /// The address in text form for display and JSON (`""` when empty).
    pub fn address_text(&self) -> String {
        match &self.value {
            IpValue::Text(text) => text.clone(),
            IpValue::Empty => String::new(),
            _ => self.to_ip().map(|ip| ip.to_string()).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hresult::Hresult;

    #[test]
    fn path_status_values() {
        let expect = [
            (PathStatus::Unknown, 0),
            (PathStatus::Online, 1),
            (PathStatus::Failed, 5),
            (PathStatus::Standby, 7),
        ];
        for (status, value) in expect {
            assert_eq!(status as i32, value);
            assert_eq!(PathStatus::try_from(value).unwrap(), status);
        }
        assert_eq!(PathStatus::Online.vds_name(), "VDS_MPS_ONLINE");
        for bad in [-1, 2, 3, 4, 6, 8, i32::MIN, i32::MAX] {
            assert_eq!(
                PathStatus::try_from(bad).unwrap_err().hresult,
                Hresult::E_INVALIDARG
            );
        }
    }

    #[test]
    fn hw_provider_type_values() {
        for value in 0..=5 {
            let t = HwProviderType::try_from(value).unwrap();
            assert_eq!(t as i32, value);
            assert_eq!(t.is_valid_on_path(), value != 5);
        }
        assert_eq!(HwProviderType::Iscsi.vds_name(), "VDS_HWT_ISCSI");
        assert!(HwProviderType::try_from(6).is_err());
    }

    #[test]
    fn policy_values_names_and_flags() {
        assert!(LoadBalancePolicy::try_from(0).is_err());
        assert!(LoadBalancePolicy::try_from(8).is_err());
        let names = [
            "failover",
            "round-robin",
            "round-robin-with-subset",
            "least-queue-depth",
            "weighted-paths",
            "least-blocks",
            "service-time",
        ];
        for (i, policy) in LoadBalancePolicy::ALL.iter().enumerate() {
            let value = i as i32 + 1;
            assert_eq!(*policy as i32, value);
            assert_eq!(policy.config_name(), names[i]);
            assert_eq!(policy.support_flag().0, 1 << i);
            assert_eq!(LoadBalancePolicy::parse_any(names[i]).unwrap(), *policy);
            assert_eq!(
                LoadBalancePolicy::parse_any(policy.vds_name()).unwrap(),
                *policy
            );
            assert_eq!(
                LoadBalancePolicy::parse_any(&value.to_string()).unwrap(),
                *policy
            );
        }
        assert_eq!(
            LoadBalancePolicy::RoundRobinWithSubset.vds_name(),
            "VDS_LBP_ROUND_ROBIN_WITH_SUBSET"
        );
        for bad in ["", "0", "8", "-1", "VDS_LBP_UNKNOWN", "Round-Robin", "rr"] {
            assert_eq!(
                LoadBalancePolicy::parse_any(bad).unwrap_err().hresult,
                Hresult::E_INVALIDARG,
                "{bad}"
            );
        }
        assert_eq!(LbSupportFlags::ALL.policies().count(), 7);
        assert_eq!(LbSupportFlags(0x80).policies().count(), 0);
    }

    #[test]
    fn hba_enums() {
        let types = [1, 2, 3, 5, 6, 7, 8, 9, 10, 20, 21];
        for value in types {
            assert_eq!(HbaPortType::try_from(value).unwrap() as i32, value);
        }
        for bad in [0, 4, 11, 19, 22] {
            assert!(HbaPortType::try_from(bad).is_err());
        }
        assert_eq!(HbaPortType::Ptp.vds_name(), "VDS_HPT_PTP");
        for value in 1..=8 {
            assert_eq!(HbaPortStatus::try_from(value).unwrap() as i32, value);
        }
        assert!(HbaPortStatus::try_from(0).is_err());
        assert!(HbaPortStatus::try_from(9).is_err());
        assert_eq!(HbaPortSpeedFlags::GBIT_10.0, 0x4);
        assert_eq!(HbaPortSpeedFlags::GBIT_4.0, 0x8);
        assert_eq!(
            HbaPortSpeedFlags(0x8005).vds_names(),
            ["VDS_HSF_1GBIT", "VDS_HSF_10GBIT", "VDS_HSF_NOT_NEGOTIATED"]
        );
        assert_eq!(HbaPortSpeedFlags::UNKNOWN.vds_names(), ["VDS_HSF_UNKNOWN"]);
    }

    #[test]
    fn wwn_forms() {
        let wwn = Wwn::from_u64(0x2000_0025_b500_000a);
        for text in [
            "20:00:00:25:b5:00:00:0a",
            "20-00-00-25-B5-00-00-0A",
            "0x20000025b500000a",
            "20000025B500000A",
        ] {
            assert_eq!(text.parse::<Wwn>().unwrap(), wwn, "{text}");
        }
        for bad in [
            "",
            "20:00:00:25:b5:00:00",
            "20:00:00:25:b5:00:00:0a:01",
            "2:00:00:25:b5:00:00:0a",
            "0x2000",
            "zz00000000000000",
            "+000000000000000",
        ] {
            assert_eq!(
                bad.parse::<Wwn>().unwrap_err().hresult,
                Hresult::E_INVALIDARG,
                "{bad}"
            );
        }
        assert_eq!(
            serde_json::to_string(&wwn).unwrap(),
            "\"20:00:00:25:b5:00:00:0a\""
        );
    }

    #[test]
    fn id64_forms() {
        assert_eq!(format_id64(0x2a), "0x000000000000002a");
        assert_eq!(parse_id64("0x2a").unwrap(), 42);
        assert_eq!(parse_id64("42").unwrap(), 42);
        assert_eq!(parse_id64("0xffffffffffffffff").unwrap(), u64::MAX);
        for bad in ["", "0x", "0x10000000000000000", "-1", "x1", "0xg"] {
            assert!(parse_id64(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn path_id_orders_by_source_then_path() {
        let mut ids = vec![PathId::new(2, 1), PathId::new(1, 9), PathId::new(1, 2)];
        ids.sort();
        assert_eq!(
            ids,
            [PathId::new(1, 2), PathId::new(1, 9), PathId::new(2, 1)]
        );
    }

    #[test]
    fn ip_address_forms() {
        let v4 = IpAddress::from_ip("10.0.2.5".parse().unwrap(), 3260);
        assert_eq!(v4.value, IpValue::Ipv4(0x0a00_0205));
        let v6 = IpAddress::from_socket_addr("[fe80::1%3]:10809".parse().unwrap());
        assert_eq!(v6.address_type(), IpAddressType::Ipv6);
        assert!(matches!(v6.value, IpValue::Ipv6 { scope_id: 3, .. }));
        assert_eq!(v6.port, 10809);
        let text = IpAddress::text("10.0.0.1", 0).unwrap();
        assert_eq!(text.to_ip(), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(IpAddress::text("host.example", 0).unwrap().to_ip(), None);
        assert!(IpAddress::text(&"a".repeat(257), 0).is_err());
        assert_eq!(IpAddress::EMPTY.address_type(), IpAddressType::Empty);
        assert_eq!(IpAddress::EMPTY.address_text(), "");
        assert_eq!(IpAddressType::try_from(3).unwrap(), IpAddressType::Empty);
        assert!(IpAddressType::try_from(4).is_err());
    }

    #[test]
    fn guid_is_stable() {
        // Pinned: a change here would change every persisted or reported object id.
        assert_eq!(
            Guid::derive("target-portal", "10.0.1.10:10809").to_string(),
            "eb56d378-f609-5a5d-974f-5d215ba57040"
        );
        let g = Guid::derive("hba-port", "x");
        assert_eq!(g.to_string().parse::<Guid>().unwrap(), g);
        assert_eq!(
            serde_json::from_str::<Guid>(&serde_json::to_string(&g).unwrap()).unwrap(),
            g
        );
        assert!("nope".parse::<Guid>().is_err());
        assert_ne!(Guid::derive("a", "bc"), Guid::derive("ab", "c"));
        assert_eq!(Guid::derive("x", "y").0.get_version_num(), 5);
    }
}
