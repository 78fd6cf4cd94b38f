//! A frame a model copied out of guest memory, with room in front of it for the virtio-net
//! header a backend carries: when the copy goes out at once (a large frame's copied headers,
//! sent with the rest from guest memory), header and copy reach a tap as one piece (see
//! [`super::NetPort::send_frame`]), which the kernel takes for less than two. A small frame
//! goes through the port's outbox instead ([`super::NetPort::queue_frame`]), which copies it
//! there, header in front, from this copy of its headers and from guest memory.

use net_backends::vnet::VNET_HDR_LEN;

/// The frame derefs to its bytes; the room stays in front whatever the frame's length.
/// The default one has no allocation yet (a stand-in while a model has its stage out with
/// `mem::take`).
#[derive(Debug, Clone, Default)]
pub struct TxStage {
    /// The room, then the frame; empty until first used.
    buf: Vec<u8>,
}

impl TxStage {
    /// An empty frame; room for `len` bytes of it before it reallocates.
    pub fn with_capacity(len: usize) -> TxStage {
        let mut buf = Vec::with_capacity(VNET_HDR_LEN + len);
        buf.resize(VNET_HDR_LEN, 0);
        TxStage { buf }
    }

    /// The room, for a stage that had none yet.
    fn make_room(&mut self) {
        if self.buf.len() < VNET_HDR_LEN {
            self.buf.resize(VNET_HDR_LEN, 0);
        }
    }

    /// Empties the frame.
    pub fn clear(&mut self) {
        self.buf.truncate(VNET_HDR_LEN);
        self.make_room();
    }

    /// The frame cut or grown to `len` bytes, new ones zero.
    pub fn resize(&mut self, len: usize) {
        self.buf.resize(VNET_HDR_LEN + len, 0);
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.make_room();
        self.buf.extend_from_slice(bytes);
    }

    /// The room in front, and the frame.
    pub fn split(&mut self) -> (&mut [u8; VNET_HDR_LEN], &mut [u8]) {
        self.make_room();
        let (room, frame) = self.buf.split_at_mut(VNET_HDR_LEN);
        let room = room.try_into().expect("the room is VNET_HDR_LEN bytes");
        (room, frame)
    }
}

impl std::ops::Deref for TxStage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.get(VNET_HDR_LEN..).unwrap_or_default()
    }
}

impl std::ops::DerefMut for TxStage {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf.get_mut(VNET_HDR_LEN..).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_room_stays_in_front_of_the_frame() {
        let mut s = TxStage::with_capacity(16);
        assert!(s.is_empty());
        s.extend_from_slice(b"abcdef");
        s.extend_from_slice(b"!");
        assert_eq!(&s[..], b"abcdef!");
        s.resize(3);
        s[0] = b'z';
        assert_eq!(&s[..], b"zbc");
        let start = s.as_ptr() as usize;
        let (room, frame) = s.split();
        *room = [7; VNET_HDR_LEN];
        assert_eq!(room.as_ptr_range().end as usize, start, "right in front");
        assert_eq!(frame, b"zbc");
        s.clear();
        assert!(s.is_empty());
        s.resize(2);
        assert_eq!(&s[..], [0, 0]);
        // The stand-in without an allocation works as well.
        let mut d = TxStage::default();
        assert!(d.is_empty());
        d.extend_from_slice(b"ab");
        assert_eq!(&d[..], b"ab");
        let mut d = TxStage::default();
        assert_eq!(d.split().1, b"");
        let mut d = TxStage::default();
        d.extend_from_slice(b"c");
        assert_eq!(&d[..], b"c");
        let mut d = TxStage::default();
        d.resize(1);
        assert_eq!(d.split().1, [0]);
    }
}
