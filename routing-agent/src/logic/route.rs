//! Validation and normalisation of one `Route`: from the strings of the spec to typed
//! destinations and gateways, with errors that name the object and the field.
use std::net::IpAddr;

use ipnet::IpNet;

use crate::logic::crd::Route;
use crate::logic::owner;

/// Address family of a validated Route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// A Route whose spec parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidRoute {
    pub family: Family,
    /// Normalised (host bits cleared), deduplicated, in spec order.
    pub destinations: Vec<IpNet>,
    /// Deduplicated, in spec order.
    pub gateways: Vec<IpAddr>,
    /// Non-fatal findings, e.g. a CIDR whose host bits were cleared.
    pub warnings: Vec<String>,
}

/// Why a Route cannot be used. `field` is the JSON path inside the object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {field}: {reason}", crate::logic::owner::describe(route))]
pub struct InvalidRoute {
    /// The owner's key (see [`crate::logic::owner`]).
    pub route: String,
    pub field: String,
    pub reason: String,
}

/// Parses a destination: a CIDR, or a bare address (a host route). Returns the
/// normalised network and whether host bits had to be cleared.
pub fn parse_destination(value: &str) -> Result<(IpNet, bool), String> {
    let value = value.trim();
    if let Ok(net) = value.parse::<IpNet>() {
        let normal = net.trunc();
        return Ok((normal, normal != net));
    }
    if let Ok(addr) = value.parse::<IpAddr>() {
        return Ok((IpNet::from(addr), false));
    }
    Err(format!("{value:?} is neither a CIDR nor an IP address"))
}

/// The kernel destinations of a Route destination: a default route becomes its two halves
/// (`0.0.0.0/1` + `128.0.0.0/1`, `::/1` + `8000::/1`; see [`crate::logic::default_route`]).
pub fn kernel_destinations(dst: IpNet) -> Vec<IpNet> {
    match dst {
        IpNet::V4(n) if n.prefix_len() == 0 => vec![
            IpNet::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 1).expect("valid"),
            IpNet::new(std::net::Ipv4Addr::new(128, 0, 0, 0).into(), 1).expect("valid"),
        ],
        IpNet::V6(n) if n.prefix_len() == 0 => vec![
            IpNet::new(std::net::Ipv6Addr::UNSPECIFIED.into(), 1).expect("valid"),
            IpNet::new(
                std::net::Ipv6Addr::new(0x8000, 0, 0, 0, 0, 0, 0, 0).into(),
                1,
            )
            .expect("valid"),
        ],
        other => vec![other],
    }
}

/// Parses a gateway: a unicast address (not unspecified, multicast, broadcast or
/// loopback).
pub fn parse_gateway(value: &str) -> Result<IpAddr, String> {
    let addr: IpAddr = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not an IP address"))?;
    let bad = match addr {
        IpAddr::V4(a) => {
            a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback()
        }
        IpAddr::V6(a) => a.is_unspecified() || a.is_multicast() || a.is_loopback(),
    };
    if bad {
        return Err(format!(
            "{addr} is not a unicast address a gateway can have"
        ));
    }
    Ok(addr)
}

/// Validates a Route. The first error wins (the field named is the one to fix first).
pub fn validate(route: &Route) -> Result<ValidRoute, InvalidRoute> {
    let name = route.metadata.name.clone().unwrap_or_default();
    let kind = owner::parse(&name).0;
    // A StaticRoute's one gateway is `spec.gateway`: fields are named as its kind spells them.
    let err = |field: String, reason: String| InvalidRoute {
        field: owner::field(&name, &field),
        route: name.clone(),
        reason,
    };
    let spec = &route.spec;
    if spec.destinations.is_empty() {
        return Err(err("spec.destinations".into(), "must not be empty".into()));
    }
    if spec.gateways.is_empty() {
        return Err(err("spec.gateways".into(), "must not be empty".into()));
    }
    if kind == owner::Kind::StaticRoute && spec.gateways[0].trim().is_empty() {
        return Err(err(
            "spec.gateways[0]".into(),
            "must be set: name the gateway's address (spec.clusterservice, a host name the \
             static route operator looked up once, is not supported)"
                .into(),
        ));
    }
    let mut warnings = Vec::new();
    let mut gateways: Vec<IpAddr> = Vec::new();
    for (i, value) in spec.gateways.iter().enumerate() {
        let gw = parse_gateway(value).map_err(|r| err(format!("spec.gateways[{i}]"), r))?;
        if !gateways.contains(&gw) {
            gateways.push(gw);
        } else {
            warnings.push(format!("spec.gateways[{i}]: {gw} is listed twice"));
        }
    }
    let family = Family::of(&gateways[0]);
    if let Some((i, gw)) = gateways
        .iter()
        .enumerate()
        .find(|(_, g)| Family::of(g) != family)
    {
        return Err(err(
            format!("spec.gateways[{i}]"),
            format!(
                "{gw} is {} but spec.gateways[0] is {family}: one family per {kind}",
                Family::of(gw),
                kind = kind.as_str()
            ),
        ));
    }
    let mut destinations: Vec<IpNet> = Vec::new();
    for (i, value) in spec.destinations.iter().enumerate() {
        let (net, truncated) =
            parse_destination(value).map_err(|r| err(format!("spec.destinations[{i}]"), r))?;
        let net_family = Family::of(&net.addr());
        if net_family != family {
            return Err(err(
                format!("spec.destinations[{i}]"),
                format!(
                    "{net} is {net_family} but the gateways are {family}: one family per {}",
                    kind.as_str()
                ),
            ));
        }
        if truncated {
            warnings.push(format!(
                "spec.destinations[{i}]: {value:?} has host bits set; using {net}"
            ));
        }
        if destinations.contains(&net) {
            warnings.push(format!("spec.destinations[{i}]: {net} is listed twice"));
        } else {
            destinations.push(net);
        }
    }
    Ok(ValidRoute {
        family,
        destinations,
        gateways,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::crd::RouteSpec;

    fn route(dst: &[&str], gw: &[&str]) -> Route {
        Route::new(
            "r",
            RouteSpec {
                destinations: dst.iter().map(|s| s.to_string()).collect(),
                gateways: gw.iter().map(|s| s.to_string()).collect(),
                node_selector: None,
            },
        )
    }

    #[test]
    fn host_bits_are_cleared_with_a_warning_naming_the_value() {
        let v = validate(&route(&["1.2.3.4/5"], &["10.114.0.3"])).unwrap();
        assert_eq!(v.destinations, vec!["0.0.0.0/5".parse::<IpNet>().unwrap()]);
        assert_eq!(v.warnings.len(), 1);
        assert!(v.warnings[0].contains("\"1.2.3.4/5\""), "{:?}", v.warnings);
        assert!(v.warnings[0].contains("0.0.0.0/5"));
    }

    #[test]
    fn bare_addresses_are_host_routes() {
        let v = validate(&route(&["192.0.2.7", "2001:db8::1"][..1], &["10.0.0.1"])).unwrap();
        assert_eq!(v.destinations[0].to_string(), "192.0.2.7/32");
        let v6 = validate(&route(&["2001:db8::1"], &["fd00::1"])).unwrap();
        assert_eq!(v6.destinations[0].to_string(), "2001:db8::1/128");
        assert_eq!(v6.family, Family::V6);
    }

    #[test]
    fn default_routes_are_valid() {
        assert!(validate(&route(&["0.0.0.0/0"], &["10.114.0.3"])).is_ok());
        assert!(validate(&route(&["::/0"], &["fd00::3"])).is_ok());
    }

    #[test]
    fn mixed_families_are_rejected_naming_the_field() {
        let e = validate(&route(&["2001:db8::/32"], &["10.0.0.1"])).unwrap_err();
        assert_eq!(e.field, "spec.destinations[0]");
        assert_eq!(e.route, "r");
        let e = validate(&route(&["10.0.0.0/8"], &["10.0.0.1", "fd00::1"])).unwrap_err();
        assert_eq!(e.field, "spec.gateways[1]");
        assert!(
            e.to_string().starts_with("Route r: spec.gateways[1]:"),
            "{e}"
        );
    }

    #[test]
    fn garbage_is_rejected_naming_the_field() {
        let e = validate(&route(&["10.0.0.0/8", "nope"], &["10.0.0.1"])).unwrap_err();
        assert_eq!(e.field, "spec.destinations[1]");
        let e = validate(&route(&["10.0.0.0/33"], &["10.0.0.1"])).unwrap_err();
        assert_eq!(e.field, "spec.destinations[0]");
        let e = validate(&route(&["10.0.0.0/8"], &["10.0.0.1/24"])).unwrap_err();
        assert_eq!(e.field, "spec.gateways[0]");
        for bad in [
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "127.0.0.1",
            "::",
            "ff02::1",
        ] {
            let e = validate(&route(&["10.0.0.0/8"], &[bad])).unwrap_err();
            assert_eq!(e.field, "spec.gateways[0]", "{bad}");
        }
        assert_eq!(
            validate(&route(&[], &["10.0.0.1"])).unwrap_err().field,
            "spec.destinations"
        );
        assert_eq!(
            validate(&route(&["10.0.0.0/8"], &[])).unwrap_err().field,
            "spec.gateways"
        );
    }

    #[test]
    fn duplicates_are_folded_with_a_warning() {
        let v = validate(&route(
            &["10.0.0.0/8", "10.1.0.0/8"],
            &["10.0.0.1", "10.0.0.1"],
        ))
        .unwrap();
        assert_eq!(v.destinations.len(), 1);
        assert_eq!(v.gateways.len(), 1);
        assert_eq!(
            v.warnings.len(),
            3,
            "host bits, duplicate destination, duplicate gateway"
        );
    }
}
