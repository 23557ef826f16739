//! Nexthop objects (`RTM_{NEW,DEL,GET}NEXTHOP`, Linux ≥ 5.3; resilient groups ≥ 5.13).
//!
//! Written by hand because rtnetlink 0.24 / netlink-packet-route 0.34 have no nexthop
//! messages. Framing and attribute TLVs come from netlink-packet-core, the socket from
//! netlink-sys; this module only lays out `struct nhmsg` and the `NHA_*` attributes of
//! `include/uapi/linux/nexthop.h`, and speaks a synchronous request/ack protocol (each
//! call is one short kernel round trip).
use std::net::IpAddr;

use netlink_packet_core::{
    DefaultNla, Emitable, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, NlaBuffer, NlasIterator,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

pub const RTM_NEWNEXTHOP: u16 = 104;
pub const RTM_DELNEXTHOP: u16 = 105;
pub const RTM_GETNEXTHOP: u16 = 106;
/// Multicast group of nexthop notifications.
pub const RTNLGRP_NEXTHOP: u32 = 32;

const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_GROUP_TYPE: u16 = 3;
const NHA_BLACKHOLE: u16 = 4;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const NHA_RES_GROUP: u16 = 12;
const NHA_RES_GROUP_BUCKETS: u16 = 1;
const NHA_RES_GROUP_IDLE_TIMER: u16 = 2;
const NHA_RES_GROUP_UNBALANCED_TIMER: u16 = 3;
const NEXTHOP_GRP_TYPE_MPATH: u16 = 0;
const NEXTHOP_GRP_TYPE_RES: u16 = 1;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(1 << 15 | 1 << 14);
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
/// `USER_HZ`: the kernel reports resilient-group timers in clock ticks.
const USER_HZ: u32 = 100;

/// Parameters of a resilient group (see ip-nexthop(8)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resilient {
    pub buckets: u16,
    /// Seconds a bucket must be idle before it may move to another next hop.
    pub idle_timer_s: u32,
    /// Seconds the group may stay unbalanced (a gateway back, holding fewer buckets than
    /// its share) before its buckets move even when busy; 0: never.
    pub unbalanced_timer_s: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NexthopKind {
    /// A single next hop: a gateway reached through an interface.
    Gateway {
        gateway: IpAddr,
        oif: u32,
    },
    /// A group of next-hop ids with weights (1..=256).
    Group {
        members: Vec<(u32, u16)>,
        resilient: Option<Resilient>,
    },
    Blackhole,
    /// Something this module does not model (encap, fdb, ...): never ours.
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nexthop {
    pub id: u32,
    /// `nh_protocol`: who installed it. The agent marks its own with its protocol id.
    pub protocol: u8,
    pub kind: NexthopKind,
}

/// A netlink error with the kernel's extended-ack text when it sent one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}", std::io::Error::from_raw_os_error(*errno), message.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
pub struct NlError {
    pub errno: i32,
    pub message: Option<String>,
}

impl NlError {
    fn io(e: std::io::Error) -> Self {
        NlError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: Some(e.to_string()),
        }
    }
}

/// The payload of one nexthop message (`struct nhmsg` + attributes).
#[derive(Clone, Debug, PartialEq, Eq)]
struct NhMsg {
    kind: u16,
    family: u8,
    protocol: u8,
    nlas: Vec<DefaultNla>,
}

impl NetlinkSerializable for NhMsg {
    fn message_type(&self) -> u16 {
        self.kind
    }
    fn buffer_len(&self) -> usize {
        8 + self.nlas.as_slice().buffer_len()
    }
    fn serialize(&self, buffer: &mut [u8]) {
        buffer[..8].fill(0);
        buffer[0] = self.family;
        buffer[2] = self.protocol;
        self.nlas.as_slice().emit(&mut buffer[8..]);
    }
}

impl NetlinkDeserializable for NhMsg {
    type Error = netlink_packet_core::DecodeError;
    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, Self::Error> {
        if payload.len() < 8 {
            return Err(netlink_packet_core::DecodeError::buffer_too_small(
                payload.len(),
                8,
            ));
        }
        let mut nlas = Vec::new();
        for nla in NlasIterator::new(&payload[8..]) {
            let nla = nla?;
            nlas.push(DefaultNla::new(nla.kind(), nla.value().to_vec()));
        }
        Ok(NhMsg {
            kind: header.message_type,
            family: payload[0],
            protocol: payload[2],
            nlas,
        })
    }
}

fn nla_u32(kind: u16, v: u32) -> DefaultNla {
    DefaultNla::new(kind, v.to_ne_bytes().to_vec())
}

fn nla_u16(kind: u16, v: u16) -> DefaultNla {
    DefaultNla::new(kind, v.to_ne_bytes().to_vec())
}

fn nested(kind: u16, inner: &[DefaultNla]) -> DefaultNla {
    let mut buf = vec![0; inner.buffer_len()];
    inner.emit(&mut buf);
    DefaultNla::new(kind | NLA_F_NESTED, buf)
}

fn to_msg(nh: &Nexthop) -> NhMsg {
    let mut nlas = vec![nla_u32(NHA_ID, nh.id)];
    let family = match &nh.kind {
        NexthopKind::Gateway { gateway, oif } => {
            nlas.push(nla_u32(NHA_OIF, *oif));
            match gateway {
                IpAddr::V4(a) => {
                    nlas.push(DefaultNla::new(NHA_GATEWAY, a.octets().to_vec()));
                    AF_INET
                }
                IpAddr::V6(a) => {
                    nlas.push(DefaultNla::new(NHA_GATEWAY, a.octets().to_vec()));
                    AF_INET6
                }
            }
        }
        NexthopKind::Group { members, resilient } => {
            // struct nexthop_grp { u32 id; u8 weight; u8 weight_high; u16 resvd2; },
            // weight stored minus one.
            let mut grp = Vec::with_capacity(members.len() * 8);
            for (id, weight) in members {
                let w = weight.saturating_sub(1);
                grp.extend_from_slice(&id.to_ne_bytes());
                grp.push((w & 0xff) as u8);
                grp.push((w >> 8) as u8);
                grp.extend_from_slice(&[0, 0]);
            }
            nlas.push(DefaultNla::new(NHA_GROUP, grp));
            match resilient {
                Some(r) => {
                    nlas.push(nla_u16(NHA_GROUP_TYPE, NEXTHOP_GRP_TYPE_RES));
                    nlas.push(nested(
                        NHA_RES_GROUP,
                        &[
                            nla_u16(NHA_RES_GROUP_BUCKETS, r.buckets),
                            nla_u32(NHA_RES_GROUP_IDLE_TIMER, r.idle_timer_s * USER_HZ),
                            nla_u32(
                                NHA_RES_GROUP_UNBALANCED_TIMER,
                                r.unbalanced_timer_s * USER_HZ,
                            ),
                        ],
                    ));
                }
                None => nlas.push(nla_u16(NHA_GROUP_TYPE, NEXTHOP_GRP_TYPE_MPATH)),
            }
            0
        }
        NexthopKind::Blackhole => {
            nlas.push(DefaultNla::new(NHA_BLACKHOLE, vec![]));
            AF_INET
        }
        NexthopKind::Other => AF_INET,
    };
    NhMsg {
        kind: RTM_NEWNEXTHOP,
        family,
        protocol: nh.protocol,
        nlas,
    }
}

fn nla_value_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

fn nla_value_u16(v: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?))
}

fn from_msg(msg: &NhMsg) -> Option<Nexthop> {
    let mut id = None;
    let (mut gateway, mut oif, mut group, mut group_type) =
        (None, None, None, NEXTHOP_GRP_TYPE_MPATH);
    let (mut blackhole, mut other, mut res) = (false, false, None);
    for nla in &msg.nlas {
        let mut buf = vec![0u8; nla.buffer_len()];
        nla.emit(&mut buf);
        let b = NlaBuffer::new(&buf);
        let value = b.value();
        match b.kind() & NLA_TYPE_MASK {
            NHA_ID => id = nla_value_u32(value),
            NHA_OIF => oif = nla_value_u32(value),
            NHA_GATEWAY => {
                gateway = match value.len() {
                    4 => Some(IpAddr::from(<[u8; 4]>::try_from(value).ok()?)),
                    16 => Some(IpAddr::from(<[u8; 16]>::try_from(value).ok()?)),
                    _ => None,
                }
            }
            NHA_GROUP => {
                group = Some(
                    value
                        .chunks_exact(8)
                        .map(|c| {
                            let id = u32::from_ne_bytes(c[..4].try_into().unwrap());
                            (id, (u16::from(c[5]) << 8 | u16::from(c[4])) + 1)
                        })
                        .collect::<Vec<_>>(),
                )
            }
            NHA_GROUP_TYPE => group_type = nla_value_u16(value).unwrap_or(0),
            NHA_BLACKHOLE => blackhole = true,
            NHA_RES_GROUP => {
                let (mut buckets, mut idle, mut unbalanced) = (0, 0, 0);
                for inner in NlasIterator::new(value).flatten() {
                    match inner.kind() & NLA_TYPE_MASK {
                        NHA_RES_GROUP_BUCKETS => {
                            buckets = nla_value_u16(inner.value()).unwrap_or(0)
                        }
                        NHA_RES_GROUP_IDLE_TIMER => {
                            idle = nla_value_u32(inner.value()).unwrap_or(0) / USER_HZ
                        }
                        NHA_RES_GROUP_UNBALANCED_TIMER => {
                            unbalanced = nla_value_u32(inner.value()).unwrap_or(0) / USER_HZ
                        }
                        _ => {}
                    }
                }
                res = Some(Resilient {
                    buckets,
                    idle_timer_s: idle,
                    unbalanced_timer_s: unbalanced,
                });
            }
            7 | 8 | 11 => other = true, // encap, fdb
            _ => {}
        }
    }
    let kind = if other {
        NexthopKind::Other
    } else if let Some(members) = group {
        NexthopKind::Group {
            members,
            resilient: if group_type == NEXTHOP_GRP_TYPE_RES {
                res
            } else {
                None
            },
        }
    } else if blackhole {
        NexthopKind::Blackhole
    } else {
        match (gateway, oif) {
            (Some(gateway), Some(oif)) => NexthopKind::Gateway { gateway, oif },
            _ => NexthopKind::Other,
        }
    };
    Some(Nexthop {
        id: id?,
        protocol: msg.protocol,
        kind,
    })
}

/// Decodes a nexthop notification's payload (for the netlink monitor).
pub fn decode_payload(message_type: u16, payload: &[u8]) -> Option<Nexthop> {
    let mut header = NetlinkHeader::default();
    header.message_type = message_type;
    NhMsg::deserialize(&header, payload)
        .ok()
        .as_ref()
        .and_then(from_msg)
}

/// A synchronous rtnetlink socket for nexthop requests.
pub struct NexthopSocket {
    socket: Socket,
    seq: u32,
}

impl NexthopSocket {
    pub fn new() -> Result<Self, NlError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NlError::io)?;
        socket.bind_auto().map_err(NlError::io)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NlError::io)?;
        // Errors carry the kernel's explanation and no copy of our request.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        Ok(NexthopSocket { socket, seq: 0 })
    }

    /// Every nexthop object in this network namespace.
    pub fn dump(&mut self) -> Result<Vec<Nexthop>, NlError> {
        let msg = NhMsg {
            kind: RTM_GETNEXTHOP,
            family: 0,
            protocol: 0,
            nlas: vec![],
        };
        let replies = self.request(msg, NLM_F_REQUEST | NLM_F_DUMP)?;
        Ok(replies.iter().filter_map(from_msg).collect())
    }

    /// Creates `nh`, or replaces the object with its id when `replace`.
    pub fn add(&mut self, nh: &Nexthop, replace: bool) -> Result<(), NlError> {
        let how = if replace { NLM_F_REPLACE } else { NLM_F_EXCL };
        self.request(to_msg(nh), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | how)
            .map(drop)
    }

    pub fn del(&mut self, id: u32) -> Result<(), NlError> {
        let msg = NhMsg {
            kind: RTM_DELNEXTHOP,
            family: 0,
            protocol: 0,
            nlas: vec![nla_u32(NHA_ID, id)],
        };
        self.request(msg, NLM_F_REQUEST | NLM_F_ACK).map(drop)
    }

    fn request(&mut self, msg: NhMsg, flags: u16) -> Result<Vec<NhMsg>, NlError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut nl =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
        nl.header.flags = flags;
        nl.header.sequence_number = seq;
        nl.finalize();
        let mut buf = vec![0; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(NlError::io)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(NlError::io)?;
            let mut off = 0;
            while off + 16 <= data.len() {
                let len = u32::from_ne_bytes(data[off..off + 4].try_into().unwrap()) as usize;
                if len < 16 || off + len > data.len() {
                    break;
                }
                let frame = &data[off..off + len];
                off += (len + 3) & !3;
                let parsed = NetlinkMessage::<NhMsg>::deserialize(frame).map_err(|e| NlError {
                    errno: libc::EBADMSG,
                    message: Some(e.to_string()),
                })?;
                if parsed.header.sequence_number != seq {
                    continue;
                }
                match parsed.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(NlError {
                                errno: -code.get(),
                                message: ext_ack_message(&e.header),
                            }),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if !dump {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// `NLMSGERR_ATTR_MSG` from an error's trailing TLVs (after the echoed 16-byte header,
/// since the socket sets `NETLINK_CAP_ACK`).
fn ext_ack_message(echo: &[u8]) -> Option<String> {
    let tlvs = echo.get(16..)?;
    NlasIterator::new(tlvs).flatten().find_map(|nla| {
        (nla.kind() & NLA_TYPE_MASK == 1).then(|| {
            String::from_utf8_lossy(nla.value())
                .trim_end_matches('\0')
                .to_string()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(nh: Nexthop) {
        let msg = to_msg(&nh);
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        let header = NetlinkHeader::default();
        let back = NhMsg::deserialize(&header, &buf).unwrap();
        assert_eq!(from_msg(&back), Some(nh));
    }

    #[test]
    fn encodes_and_decodes_every_kind() {
        round_trip(Nexthop {
            id: 7,
            protocol: 196,
            kind: NexthopKind::Gateway {
                gateway: "10.114.0.3".parse().unwrap(),
                oif: 4,
            },
        });
        round_trip(Nexthop {
            id: 8,
            protocol: 196,
            kind: NexthopKind::Gateway {
                gateway: "fd00:114::3".parse().unwrap(),
                oif: 9,
            },
        });
        round_trip(Nexthop {
            id: 9,
            protocol: 196,
            kind: NexthopKind::Group {
                members: vec![(7, 1), (8, 256)],
                resilient: Some(Resilient {
                    buckets: 128,
                    idle_timer_s: 120,
                    unbalanced_timer_s: 30,
                }),
            },
        });
        round_trip(Nexthop {
            id: 10,
            protocol: 0,
            kind: NexthopKind::Group {
                members: vec![(7, 3)],
                resilient: None,
            },
        });
    }

    #[test]
    fn lays_out_nhmsg_and_group_entries_as_the_kernel_expects() {
        let msg = to_msg(&Nexthop {
            id: 0x01020304,
            protocol: 196,
            kind: NexthopKind::Group {
                members: vec![(5, 1)],
                resilient: None,
            },
        });
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        // nhmsg: family 0 (group), scope 0, protocol, resvd, flags u32
        assert_eq!(&buf[..8], &[0, 0, 196, 0, 0, 0, 0, 0]);
        // NHA_ID: len 8, type 1, value
        assert_eq!(&buf[8..16], &[8, 0, 1, 0, 4, 3, 2, 1]);
        // NHA_GROUP: len 12, type 2, {id 5, weight-1 = 0, 0, resvd}
        assert_eq!(&buf[16..28], &[12, 0, 2, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn ext_ack_text_is_extracted() {
        let mut echo = vec![0u8; 16];
        let text = b"Nexthop has invalid gateway\0";
        let len = (4 + text.len()) as u16;
        echo.extend_from_slice(&len.to_ne_bytes());
        echo.extend_from_slice(&1u16.to_ne_bytes());
        echo.extend_from_slice(text);
        while !echo.len().is_multiple_of(4) {
            echo.push(0);
        }
        assert_eq!(
            ext_ack_message(&echo).as_deref(),
            Some("Nexthop has invalid gateway")
        );
    }
}
