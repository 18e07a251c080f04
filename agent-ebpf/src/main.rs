//! flowwarden's kernel programs: XDP ingress, TC ingress and TC egress over one verdict,
//! plus two reference programs that the datapath benchmark measures against.
#![no_std]
#![no_main]
// Atomic adds without fetch (BPF_XADD): the BPF target offers no AtomicU64::fetch_add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod logs;
mod maps;
mod parse;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::{
    parse::{Bytes, Parsed, parse},
    verdict::Action,
};

/// Headers we may need in the linear part of an skb: Ethernet, two VLAN tags, IPv6 with
/// extension headers up to the parser's limit, and a TCP header.
const TC_PULL_LEN: u32 = 512 + 20;

#[xdp]
pub fn fw_xdp_ingress(ctx: XdpContext) -> u32 {
    let bytes = Bytes::new(ctx.data(), ctx.data_end());
    let len = (ctx.data_end() - ctx.data()) as u64;
    let action = match parse(bytes) {
        Parsed::Ignore => Action::Pass,
        // SAFETY: the context pointer is valid for the whole program run.
        Parsed::Malformed => verdict::malformed(unsafe { (*ctx.ctx).ingress_ifindex }, len),
        Parsed::Packet(pkt) => verdict::ingress(&pkt, len),
    };
    match action {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
    }
}

#[classifier]
pub fn fw_tc_ingress(ctx: TcContext) -> i32 {
    let action = match tc_parse(&ctx) {
        Parsed::Ignore => Action::Pass,
        // SAFETY: the context pointer is valid for the whole program run.
        Parsed::Malformed => {
            verdict::malformed(unsafe { (*ctx.skb.skb).ifindex }, ctx.len() as u64)
        }
        Parsed::Packet(pkt) => verdict::ingress(&pkt, ctx.len() as u64),
    };
    tc_action(action)
}

#[classifier]
pub fn fw_tc_egress(ctx: TcContext) -> i32 {
    let action = match tc_parse(&ctx) {
        // Our own host's packets: nothing to enforce on a malformed reply.
        Parsed::Ignore | Parsed::Malformed => Action::Pass,
        Parsed::Packet(pkt) => verdict::egress(&pkt, ctx.len() as u64),
    };
    tc_action(action)
}

/// Parses an skb, pulling headers into its linear part first when they are not there.
#[inline(always)]
fn tc_parse(ctx: &TcContext) -> Parsed {
    let want = core::cmp::min(ctx.len(), TC_PULL_LEN);
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        // A failed pull leaves the packet as it was; the parser then sees what is there.
        let _ = ctx.pull_data(want);
    }
    parse(Bytes::new(ctx.data(), ctx.data_end()))
}

#[inline(always)]
fn tc_action(action: Action) -> i32 {
    match action {
        Action::Pass => TC_ACT_OK,
        Action::Drop => TC_ACT_SHOT,
    }
}

/// Benchmark reference: the cheapest possible XDP program.
#[xdp]
pub fn fw_bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark reference: parse nothing, one hash lookup on a flow-sized key, one counter add.
#[xdp]
pub fn fw_bench_floor(_ctx: XdpContext) -> u32 {
    let key = agent_common::FlowKey::default();
    if let Some(v) = maps::BENCH_FLOOR.get_ptr_mut(key) {
        // SAFETY: a map value pointer stays valid for the whole program run.
        unsafe { maps::atomic_add(v, 1) };
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
