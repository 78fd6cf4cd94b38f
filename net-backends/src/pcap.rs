//! Packet capture (`-object filter-dump`): a backend wrapper that writes every frame crossing
//! it, both directions, to a classic pcap file (microsecond timestamps, LINKTYPE_ETHERNET),
//! as the wire carries them: a virtio-net header, when the backend has one, is not written.
//!
//! Each record goes out in one write(2), so the file is readable while nicvm runs and
//! complete up to the last frame if nicvm is killed.

use crate::vnet::VNET_HDR_LEN;
use crate::{Capabilities, EventSet, NetBackend, Offloads, UsernetAnswer, UsernetAsk};
use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::fd::RawFd;
use std::time::{SystemTime, UNIX_EPOCH};

const PCAP_MAGIC: u32 = 0xa1b2_c3d4;
const LINKTYPE_ETHERNET: u32 = 1;
/// QEMU's default `maxlen` for filter-dump.
pub const DEFAULT_MAXLEN: u32 = 65_536;

pub struct PcapDump<B> {
    inner: B,
    file: File,
    maxlen: u32,
    record: Vec<u8>,
    /// Set after the first write error, which is logged once; capture then stops.
    failed: bool,
}

/// The 24-byte pcap file header.
fn file_header(snaplen: u32) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&PCAP_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    // thiszone and sigfigs stay 0.
    h[16..20].copy_from_slice(&snaplen.to_le_bytes());
    h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    h
}

/// The capture of a netdev no NIC uses, as QEMU writes it: the file header, no frames (QEMU
/// drops what such a netdev receives before its filters see it).
pub fn empty_capture(mut file: File, maxlen: u32) -> io::Result<()> {
    file.write_all(&file_header(maxlen))
}

impl<B: NetBackend> PcapDump<B> {
    /// Writes the file header to `file` (created or truncated by the caller), then the
    /// frames.
    pub fn new(inner: B, mut file: File, maxlen: u32) -> io::Result<Self> {
        file.write_all(&file_header(maxlen))?;
        Ok(PcapDump {
            inner,
            file,
            maxlen,
            record: Vec::with_capacity(2048),
            failed: false,
        })
    }

    fn write_record(&mut self, pieces: &[&[u8]]) {
        if self.failed {
            return;
        }
        let mut skip = if self.inner.capabilities().vnet_hdr {
            VNET_HDR_LEN
        } else {
            0
        };
        let orig: usize = pieces
            .iter()
            .map(|p| p.len())
            .sum::<usize>()
            .saturating_sub(skip);
        let incl = orig.min(self.maxlen as usize);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.record.clear();
        self.record
            .extend_from_slice(&(now.as_secs() as u32).to_le_bytes());
        self.record
            .extend_from_slice(&now.subsec_micros().to_le_bytes());
        self.record.extend_from_slice(&(incl as u32).to_le_bytes());
        self.record.extend_from_slice(&(orig as u32).to_le_bytes());
        let mut left = incl;
        for p in pieces {
            let cut = skip.min(p.len());
            skip -= cut;
            let p = &p[cut..];
            let n = p.len().min(left);
            self.record.extend_from_slice(&p[..n]);
            left -= n;
        }
        if let Err(e) = self.file.write_all(&self.record) {
            log::warn!("filter-dump: cannot write the capture: {e}; capture stopped");
            self.failed = true;
        }
    }
}

impl<B: NetBackend> NetBackend for PcapDump<B> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn set_rx_offloads(&mut self, o: Offloads) -> io::Result<()> {
        self.inner.set_rx_offloads(o)
    }

    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<()> {
        self.inner.send(frame)?;
        let pieces: Vec<&[u8]> = frame.iter().map(|s| &s[..]).collect();
        self.write_record(&pieces);
        Ok(())
    }

    /// The batch as the inner backend sends it, then a record of each frame it took.
    fn send_batch(&mut self, iov: &[IoSlice<'_>], ends: &[usize], out: &mut Vec<io::Result<()>>) {
        let first = out.len();
        self.inner.send_batch(iov, ends, out);
        let mut start = 0;
        for (r, &end) in out[first..].iter().zip(ends) {
            let frame = iov.get(start..end).unwrap_or(&[]);
            start = end.max(start);
            if r.is_ok() {
                let pieces: Vec<&[u8]> = frame.iter().map(|s| &s[..]).collect();
                self.write_record(&pieces);
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let r = self.inner.recv(buf)?;
        if let Some(n) = r {
            self.write_record(&[&buf[..n]]);
        }
        Ok(r)
    }

    /// The batch as the inner backend reads it, then a record of each frame.
    fn recv_batch(
        &mut self,
        slab: &mut [u8],
        slot: usize,
        n: usize,
        frames: &mut Vec<(usize, usize)>,
    ) -> io::Result<()> {
        let first = frames.len();
        self.inner.recv_batch(slab, slot, n, frames)?;
        for &(i, len) in &frames[first..] {
            let start = i.saturating_mul(slot);
            let end = start.saturating_add(len.min(slot));
            if let Some(f) = slab.get(start..end) {
                self.write_record(&[f]);
            }
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.inner.fd()
    }

    fn watch(&self, rx: bool, tx: bool, out: &mut Vec<(RawFd, EventSet)>) {
        self.inner.watch(rx, tx, out)
    }

    fn ready(&mut self, fd: RawFd, events: EventSet) {
        self.inner.ready(fd, events)
    }

    fn link_up(&self) -> bool {
        self.inner.link_up()
    }

    fn dropped(&self) -> u64 {
        self.inner.dropped()
    }
    fn usernet(&self, ask: UsernetAsk) -> Option<std::sync::mpsc::Receiver<UsernetAnswer>> {
        self.inner.usernet(ask)
    }

    fn set_queue_enabled(&mut self, on: bool) -> io::Result<()> {
        self.inner.set_queue_enabled(on)
    }
}

impl<B: NetBackend + ?Sized> NetBackend for Box<B> {
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn set_rx_offloads(&mut self, o: Offloads) -> io::Result<()> {
        (**self).set_rx_offloads(o)
    }
    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<()> {
        (**self).send(frame)
    }
    fn send_batch(&mut self, iov: &[IoSlice<'_>], ends: &[usize], out: &mut Vec<io::Result<()>>) {
        (**self).send_batch(iov, ends, out)
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        (**self).recv(buf)
    }
    fn recv_batch(
        &mut self,
        slab: &mut [u8],
        slot: usize,
        n: usize,
        frames: &mut Vec<(usize, usize)>,
    ) -> io::Result<()> {
        (**self).recv_batch(slab, slot, n, frames)
    }
    fn fd(&self) -> RawFd {
        (**self).fd()
    }
    fn watch(&self, rx: bool, tx: bool, out: &mut Vec<(RawFd, EventSet)>) {
        (**self).watch(rx, tx, out)
    }
    fn ready(&mut self, fd: RawFd, events: EventSet) {
        (**self).ready(fd, events)
    }
    fn link_up(&self) -> bool {
        (**self).link_up()
    }
    fn dropped(&self) -> u64 {
        (**self).dropped()
    }
    fn usernet(&self, ask: UsernetAsk) -> Option<std::sync::mpsc::Receiver<UsernetAnswer>> {
        (**self).usernet(ask)
    }
    fn set_queue_enabled(&mut self, on: bool) -> io::Result<()> {
        (**self).set_queue_enabled(on)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::pair;

    /// Records of a pcap file: (incl_len, orig_len, data).
    fn records(bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(0), PCAP_MAGIC);
        assert_eq!(u32_at(20), LINKTYPE_ETHERNET);
        let mut out = vec![];
        let mut o = 24;
        while o < bytes.len() {
            let (incl, orig) = (u32_at(o + 8), u32_at(o + 12));
            out.push((incl, orig, bytes[o + 16..o + 16 + incl as usize].to_vec()));
            o += 16 + incl as usize;
        }
        out
    }

    #[test]
    fn both_directions_without_the_vnet_header_and_truncated_to_maxlen() {
        let dir = std::env::temp_dir().join(format!("nicvm-pcap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cap.pcap");
        let caps = Capabilities {
            vnet_hdr: true,
            ..Default::default()
        };
        let (b, peer) = pair(caps);
        let mut d = PcapDump::new(b, File::create(&path).unwrap(), 100).unwrap();
        let hdr = [0u8; VNET_HDR_LEN];
        let frame: Vec<u8> = (0..60u8).collect();
        // Header and frame in separate pieces, and split inside the header.
        d.send(&[
            IoSlice::new(&hdr[..4]),
            IoSlice::new(&hdr[4..]),
            IoSlice::new(&frame),
        ])
        .unwrap();
        let mut big = hdr.to_vec();
        big.extend((0..300).map(|i| i as u8));
        peer.inject(&big);
        let mut buf = vec![0u8; 2048];
        assert_eq!(d.recv(&mut buf).unwrap(), Some(big.len()));
        let r = records(&std::fs::read(&path).unwrap());
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (60, 60, frame));
        assert_eq!(
            (r[1].0, r[1].1),
            (100, 300),
            "truncated to maxlen, true length kept"
        );
        assert_eq!(r[1].2, big[VNET_HDR_LEN..VNET_HDR_LEN + 100]);
        assert_eq!(peer.take_sent().len(), 1, "the frame still went out");
    }

    /// A backend whose batches are counted, behind a `Box<dyn NetBackend>` as ports hold
    /// them: the box hands the batch on whole (not frame by frame through `send`), and a
    /// capture records each frame the backend took.
    #[test]
    fn a_batch_reaches_the_backend_whole_and_each_frame_is_recorded() {
        struct Batching {
            inner: crate::mem::MemBackend,
            batches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        }
        impl NetBackend for Batching {
            fn capabilities(&self) -> Capabilities {
                self.inner.capabilities()
            }
            fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<()> {
                self.inner.send(frame)
            }
            fn send_batch(
                &mut self,
                iov: &[IoSlice<'_>],
                ends: &[usize],
                out: &mut Vec<io::Result<()>>,
            ) {
                self.batches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                crate::send_each(&mut self.inner, iov, ends, out)
            }
            fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
                self.inner.recv(buf)
            }
            fn fd(&self) -> RawFd {
                self.inner.fd()
            }
        }
        let dir = std::env::temp_dir().join(format!("nicvm-pcapb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cap.pcap");
        let (b, peer) = pair(Capabilities::default());
        let batches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let boxed: Box<dyn NetBackend> = Box::new(Batching {
            inner: b,
            batches: batches.clone(),
        });
        let mut d = PcapDump::new(boxed, File::create(&path).unwrap(), 100).unwrap();
        let (a, b2, c) = ([1u8; 60], [2u8; 61], [3u8; 62]);
        let iov = [
            IoSlice::new(&a[..30]),
            IoSlice::new(&a[30..]),
            IoSlice::new(&b2),
            IoSlice::new(&c),
        ];
        let mut out = Vec::new();
        d.send_batch(&iov, &[2, 3, 4], &mut out);
        let r = records(&std::fs::read(&path).unwrap());
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(batches.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|r| r.is_ok()));
        let got: Vec<Vec<u8>> = r.into_iter().map(|r| r.2).collect();
        assert_eq!(got, vec![a.to_vec(), b2.to_vec(), c.to_vec()]);
        assert_eq!(peer.take_sent(), got, "the frames went out, in order");
    }

    /// A batch of reads through a boxed backend: each frame read is recorded, in order.
    #[test]
    fn a_batch_of_reads_is_recorded_frame_by_frame() {
        let dir = std::env::temp_dir().join(format!("nicvm-pcapr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cap.pcap");
        let (b, peer) = pair(Capabilities::default());
        let boxed: Box<dyn NetBackend> = Box::new(b);
        let mut d = PcapDump::new(boxed, File::create(&path).unwrap(), 100).unwrap();
        let frames: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 60 + i as usize]).collect();
        for f in &frames {
            peer.inject(f);
        }
        let mut slab = vec![0u8; 4 * 128];
        let mut got = Vec::new();
        d.recv_batch(&mut slab, 128, 4, &mut got).unwrap();
        let r = records(&std::fs::read(&path).unwrap());
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(got.len(), 3);
        let recorded: Vec<Vec<u8>> = r.into_iter().map(|r| r.2).collect();
        assert_eq!(recorded, frames);
    }
}
