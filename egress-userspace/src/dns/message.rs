//! The DNS wire format as the proxy needs it, pure and unit-tested: the replies the proxy makes
//! itself, the chain of an answer (CNAMEs linked to the question, then the final addresses and
//! the smallest TTL), and the few in-place edits made to relayed bytes (the ID, TTLs capped).
//!
//! The proxy relays the upstream's bytes, not a re-encoding of them: re-serialising grew
//! replies, dropped OPT records and DNSSEC bits elsewhere (istio#29675, blocky#2240). hickory
//! parses a copy for the policy. The only re-encodings are of the proxy's own replies, of a query
//! whose EDNS size is lowered to [`EDNS_PAYLOAD`], and of the truncated (TC) form of a reply too
//! big for a UDP client.

use std::net::IpAddr;

use hickory_proto::{
    op::{Edns, Message, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, rdata::opt::EdnsOption},
};

/// The EDNS UDP payload size the proxy advertises upstream and in its own replies: the DNS Flag
/// Day 2020 value, which avoids IP fragmentation on any path.
pub const EDNS_PAYLOAD: u16 = 1232;
/// The UDP payload a client without EDNS takes (RFC 1035).
pub const CLASSIC_UDP_PAYLOAD: usize = 512;
/// Extended DNS Error (RFC 8914) option code, and the info code "Blocked" (15): "the domain is
/// blocked due to an internal policy of the operator".
const EDE_OPTION: u16 = 15;
pub const EDE_BLOCKED: u16 = 15;
/// CNAME links followed before an answer is treated as a loop.
const MAX_CHAIN: usize = 16;
/// The OPT pseudo-record, whose TTL field holds EDNS flags, never a TTL.
const TYPE_OPT: u16 = 41;

/// A reply the proxy makes itself: the query's ID, opcode, RD and CD echoed, RA set, the question
/// echoed as asked (case kept), and an OPT record when the query had one (RFC 6891: an OPT in
/// the reply exactly when the query had one), carrying an Extended DNS Error when `ede` is given.
pub fn local_reply(query: &Message, rcode: ResponseCode, ede: Option<(u16, &str)>) -> Vec<u8> {
    let mut m = Message::response(query.metadata.id, query.metadata.op_code);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.checking_disabled = query.metadata.checking_disabled;
    m.metadata.response_code = rcode;
    m.add_queries(query.queries.iter().cloned());
    if let Some(asked) = &query.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        edns.set_dnssec_ok(asked.flags().dnssec_ok);
        if let Some((code, text)) = ede {
            let mut data = code.to_be_bytes().to_vec();
            data.extend_from_slice(text.as_bytes());
            edns.options_mut()
                .insert(EdnsOption::Unknown(EDE_OPTION, data));
        }
        m.set_edns(edns);
    }
    m.to_vec()
        .unwrap_or_else(|_| header_only_reply(&query_header(query), rcode))
}

/// The first 12 bytes of a query, as far as the proxy reads them without hickory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    /// The opcode and RD bits of the third byte.
    flags: u8,
}

/// The header of raw bytes, when there are 12 of them and they are a query (QR clear).
pub fn raw_header(bytes: &[u8]) -> Option<Header> {
    if bytes.len() < 12 || bytes[2] & 0x80 != 0 {
        return None;
    }
    Some(Header {
        id: u16::from_be_bytes([bytes[0], bytes[1]]),
        flags: bytes[2] & 0x79,
    })
}

fn query_header(query: &Message) -> Header {
    let op: u8 = query.metadata.op_code.into();
    Header {
        id: query.metadata.id,
        flags: ((op & 0x0f) << 3) | u8::from(query.metadata.recursion_desired),
    }
}

/// A reply of a header alone (no question): for queries hickory cannot parse (FORMERR).
pub fn header_only_reply(h: &Header, rcode: ResponseCode) -> Vec<u8> {
    let mut b = vec![0u8; 12];
    b[..2].copy_from_slice(&h.id.to_be_bytes());
    b[2] = 0x80 | h.flags;
    b[3] = 0x80 | (u16::from(rcode) & 0x0f) as u8;
    b
}

/// Sets the ID of a message in place.
pub fn set_id(bytes: &mut [u8], id: u16) {
    if bytes.len() >= 2 {
        bytes[..2].copy_from_slice(&id.to_be_bytes());
    }
}

/// The bytes to send upstream for a client's query: the client's own bytes with a fresh ID, or,
/// when the client advertises an EDNS size above [`EDNS_PAYLOAD`], a re-encoding with that size
/// (the proxy falls back to TCP itself when the upstream truncates).
pub fn upstream_query(client_bytes: &[u8], parsed: &Message, id: u16) -> Vec<u8> {
    if let Some(edns) = &parsed.edns
        && edns.max_payload() > EDNS_PAYLOAD
    {
        let mut m = parsed.clone();
        m.metadata.id = id;
        if let Some(e) = m.edns.as_mut() {
            e.set_max_payload(EDNS_PAYLOAD);
        }
        if let Ok(v) = m.to_vec() {
            return v;
        }
    }
    let mut v = client_bytes.to_vec();
    set_id(&mut v, id);
    v
}

/// The largest UDP reply a client takes: its EDNS size (at least 512), else 512.
pub fn client_udp_limit(query: &Message) -> usize {
    query.edns.as_ref().map_or(CLASSIC_UDP_PAYLOAD, |e| {
        usize::from(e.max_payload()).max(CLASSIC_UDP_PAYLOAD)
    })
}

/// A reply too big for a UDP client, truncated: the header with TC set, the question and the OPT
/// record, no records; the client retries over TCP (RFC 7766).
pub fn truncated_reply(reply: &Message, client_id: u16) -> Option<Vec<u8>> {
    let mut t = reply.truncate();
    t.metadata.id = client_id;
    t.to_vec().ok()
}

/// Whether a reply answers `question`: a response, with one question equal to it (names compared
/// case-insensitively, since 0x20-randomizing upstreams may echo another case).
pub fn answers_question(reply: &Message, question: &Query) -> bool {
    reply.metadata.message_type == hickory_proto::op::MessageType::Response
        && reply.queries.len() == 1
        && reply.queries[0].name == question.name
        && reply.queries[0].query_type == question.query_type
        && reply.queries[0].query_class == question.query_class
}

/// The part of an answer that a grant is made from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// The question's name, then each CNAME target in order.
    pub names: Vec<Name>,
    /// The A and AAAA addresses of the last name (v4-mapped IPv6 as IPv4), deduplicated, in
    /// answer order.
    pub addrs: Vec<IpAddr>,
    /// The smallest TTL of the CNAMEs followed and of the address records; `None` without
    /// addresses.
    pub min_ttl: Option<u32>,
}

/// The chain of an answer to `question`: only CNAMEs linked to the question are followed, and
/// only the answer section is read, never the authority or additional sections (which a hostile
/// or confused upstream could fill with unrelated names: cargowall#63).
pub fn chain(question: &Name, answers: &[Record]) -> Chain {
    let mut names = vec![question.clone()];
    let mut ttl = u32::MAX;
    let mut current = question.clone();
    for _ in 0..MAX_CHAIN {
        let next = answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.name == current => Some((target.0.clone(), r.ttl)),
            _ => None,
        });
        let Some((target, t)) = next else { break };
        if names.contains(&target) {
            break;
        }
        ttl = ttl.min(t);
        names.push(target.clone());
        current = target;
    }
    let mut addrs: Vec<IpAddr> = Vec::new();
    let mut addr_ttl = u32::MAX;
    for r in answers.iter().filter(|r| r.name == current) {
        let ip = match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0).to_canonical(),
            _ => continue,
        };
        addr_ttl = addr_ttl.min(r.ttl);
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    let min_ttl = (!addrs.is_empty()).then(|| ttl.min(addr_ttl));
    Chain {
        names,
        addrs,
        min_ttl,
    }
}

/// Addresses never granted, whatever name they come from (pitfall "rebinding": an approved
/// wildcard or an untrusted upstream mapping a name to the metadata service or to the host
/// itself): unspecified, loopback, link-local (169.254.0.0/16 holds the cloud metadata
/// endpoints; fe80::/10), multicast and broadcast.
pub fn never_granted(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            a.is_unspecified()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast()
        }
        IpAddr::V6(a) => {
            a.is_unspecified() || a.is_loopback() || a.is_unicast_link_local() || a.is_multicast()
        }
    }
}

/// Whether the opcode is a standard query (the only kind the proxy forwards: UPDATE and NOTIFY
/// would be a channel past the policy).
pub fn is_query(m: &Message) -> bool {
    m.metadata.op_code == OpCode::Query
}

/// Lowers every TTL above `max` to `max`, in place, so that no client caches an address longer
/// than its grant lives. The OPT record is left alone (its TTL field holds EDNS flags). Returns
/// false, with `bytes` possibly half-edited, when the message does not parse as the walk
/// expects; callers edit a copy and keep the original then.
pub fn cap_ttls(bytes: &mut [u8], max: u32) -> bool {
    fn skip_name(b: &[u8], mut i: usize) -> Option<usize> {
        loop {
            let len = usize::from(*b.get(i)?);
            match len & 0xc0 {
                0x00 if len == 0 => return Some(i + 1),
                0x00 => i += 1 + len,
                0xc0 => {
                    b.get(i + 1)?;
                    return Some(i + 2);
                }
                _ => return None,
            }
        }
    }
    let walk = |b: &mut [u8]| -> Option<()> {
        let count = |at: usize| usize::from(u16::from_be_bytes([b[at], b[at + 1]]));
        if b.len() < 12 {
            return None;
        }
        let (questions, records) = (count(4), count(6) + count(8) + count(10));
        let mut i = 12;
        for _ in 0..questions {
            i = skip_name(b, i)? + 4;
        }
        for _ in 0..records {
            i = skip_name(b, i)?;
            let fixed = b.get(i..i + 10)?;
            let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
            let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
            let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
            if rtype != TYPE_OPT && ttl > max {
                b[i + 4..i + 8].copy_from_slice(&max.to_be_bytes());
            }
            i += 10 + rdlen;
        }
        (i <= b.len()).then_some(())
    };
    walk(bytes).is_some()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::{
        op::MessageType,
        rr::{
            RecordType,
            rdata::{A, AAAA, CNAME},
        },
    };

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn query(qname: &str, edns: Option<u16>) -> Message {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name(qname), RecordType::A));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m
    }

    fn cname(from: &str, to: &str, ttl: u32) -> Record {
        Record::from_rdata(name(from), ttl, RData::CNAME(CNAME(name(to))))
    }

    fn a(owner: &str, ip: [u8; 4], ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
    }

    #[test]
    fn local_replies_echo_the_query() {
        let q = query("Blocked.Example.", Some(4096));
        let bytes = local_reply(&q, ResponseCode::NXDomain, Some((EDE_BLOCKED, "egress")));
        let r = Message::from_vec(&bytes).unwrap();
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.metadata.message_type, MessageType::Response);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert!(r.metadata.recursion_desired && r.metadata.recursion_available);
        assert_eq!(r.queries, q.queries);
        assert_eq!(r.queries[0].name.to_ascii(), "Blocked.Example.");
        let edns = r.edns.expect("an OPT for an EDNS query");
        assert_eq!(edns.max_payload(), EDNS_PAYLOAD);
        let ede = edns
            .options()
            .options
            .iter()
            .find(|(c, _)| u16::from(*c) == EDE_OPTION);
        match ede.map(|(_, o)| o) {
            Some(EdnsOption::Unknown(_, data)) => assert_eq!(&data[..], b"\x00\x0fegress"),
            other => panic!("{other:?}"),
        }
        // No OPT for a query without one.
        let bytes = local_reply(&query("x.example", None), ResponseCode::Refused, None);
        let r = Message::from_vec(&bytes).unwrap();
        assert!(r.edns.is_none());
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn header_only_replies_for_unparsable_queries() {
        let raw = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff];
        let h = raw_header(&raw).unwrap();
        let r = Message::from_vec(&header_only_reply(&h, ResponseCode::FormErr)).unwrap();
        assert_eq!(r.metadata.id, 0xabcd);
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        assert!(r.metadata.recursion_desired);
        assert!(raw_header(&raw[..11]).is_none());
        let mut reply = raw;
        reply[2] |= 0x80;
        assert!(raw_header(&reply).is_none(), "a response is not a query");
    }

    #[test]
    fn upstream_queries_keep_bytes_or_lower_the_edns_size() {
        let q = query("a.example", Some(1000));
        let bytes = q.to_vec().unwrap();
        let up = upstream_query(&bytes, &q, 0x4242);
        assert_eq!(&up[2..], &bytes[2..], "relayed as is but for the ID");
        assert_eq!(&up[..2], &[0x42, 0x42]);
        let q = query("a.example", Some(65494));
        let up = Message::from_vec(&upstream_query(&q.to_vec().unwrap(), &q, 7)).unwrap();
        assert_eq!(up.metadata.id, 7);
        assert_eq!(up.edns.unwrap().max_payload(), EDNS_PAYLOAD);
        assert_eq!(client_udp_limit(&q), 65494);
        assert_eq!(client_udp_limit(&query("a", None)), 512);
        assert_eq!(client_udp_limit(&query("a", Some(100))), 512);
    }

    #[test]
    fn chains_follow_linked_cnames_to_the_final_addresses() {
        let answers = vec![
            cname("www.example.com", "edge.cdn.test", 300),
            a("unrelated.test", [192, 0, 2, 99], 1),
            cname("EDGE.cdn.test", "e1.cdn.test", 60),
            a("e1.cdn.test", [192, 0, 2, 1], 120),
            a("e1.cdn.test", [192, 0, 2, 2], 90),
            a("e1.cdn.test", [192, 0, 2, 1], 120),
            Record::from_rdata(
                name("e1.cdn.test"),
                200,
                RData::AAAA(AAAA("::ffff:192.0.2.3".parse().unwrap())),
            ),
        ];
        let c = chain(&name("WWW.example.com"), &answers);
        assert_eq!(
            c.names.iter().map(|n| n.to_ascii()).collect::<Vec<_>>(),
            ["WWW.example.com", "edge.cdn.test", "e1.cdn.test"]
        );
        assert_eq!(
            c.addrs,
            ["192.0.2.1", "192.0.2.2", "192.0.2.3"].map(|s| s.parse::<IpAddr>().unwrap())
        );
        assert_eq!(c.min_ttl, Some(60));
        // Addresses of names off the chain are not taken; no addresses, no TTL.
        let c = chain(&name("other.test"), &answers);
        assert!(c.addrs.is_empty() && c.min_ttl.is_none());
        // A loop ends.
        let looped = vec![cname("a.test", "b.test", 5), cname("b.test", "a.test", 5)];
        let c = chain(&name("a.test"), &looped);
        assert_eq!(c.names.len(), 2);
        assert!(c.addrs.is_empty());
    }

    #[test]
    fn ttls_are_capped_in_place_opt_untouched() {
        let mut m = Message::response(1, OpCode::Query);
        m.add_query(Query::query(name("a.example"), RecordType::A));
        m.add_answer(cname("a.example", "b.example", 86_400));
        m.add_answer(a("b.example", [192, 0, 2, 1], 30));
        let mut e = Edns::new();
        e.set_dnssec_ok(true);
        m.set_edns(e);
        let mut bytes = m.to_vec().unwrap();
        assert!(cap_ttls(&mut bytes, 3600));
        let r = Message::from_vec(&bytes).unwrap();
        assert_eq!(r.answers[0].ttl, 3600);
        assert_eq!(r.answers[1].ttl, 30);
        assert!(r.edns.unwrap().flags().dnssec_ok, "OPT flags kept");
        assert!(!cap_ttls(&mut bytes[..20], 1));
    }

    #[test]
    fn metadata_and_loopback_addresses_are_never_granted() {
        for s in [
            "169.254.169.254",
            "127.0.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(never_granted(s.parse().unwrap()), "{s}");
        }
        for s in ["192.0.2.1", "10.0.0.1", "2001:db8::1", "fd00::1"] {
            assert!(!never_granted(s.parse().unwrap()), "{s}");
        }
    }
}
