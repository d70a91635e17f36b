//! The streaming frame decoder.

use bytes::BytesMut;

use super::error::{ErrorCode, ProtocolError};
use super::frame::{Frame, FrameType};
use super::{DEFAULT_MAX_FRAME_BYTES, LENGTH_PREFIX_BYTES};

/// Turns the bytes of a session stream, in whatever pieces they arrive, into
/// frames.
///
/// Feed it with [`push`](Self::push) (or [`Extend`]) and drain it with
/// [`next_frame`](Self::next_frame) until that returns `Ok(None)`. Any input
/// is handled without panicking. The first error is final: the stream cannot
/// be resynchronised after it, so later calls return the same error.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_frame_bytes: u32,
    /// Offset of `buf[0]` in the session stream, for error messages.
    offset: u64,
    failed: Option<ProtocolError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

impl FrameDecoder {
    /// A decoder refusing frames whose length field exceeds `max_frame_bytes`.
    pub fn new(max_frame_bytes: u32) -> Self {
        FrameDecoder {
            buf: BytesMut::new(),
            max_frame_bytes,
            offset: 0,
            failed: None,
        }
    }

    pub fn max_frame_bytes(&self) -> u32 {
        self.max_frame_bytes
    }

    /// Changes the limit, e.g. to the one a WELCOME advertised. It applies
    /// from the next frame header read.
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: u32) {
        self.max_frame_bytes = max_frame_bytes;
    }

    /// Appends received bytes. Bytes after a failure are dropped.
    pub fn push(&mut self, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        // Room left, or the memory of frames already taken and dropped.
        if !self.buf.try_reclaim(data.len()) {
            self.grow(self.buf.len() + data.len());
        }
        self.buf.extend_from_slice(data);
    }

    /// Moves the buffer to one with room for at least `needed` bytes:
    /// twice that, as a growing buffer would be, but for a large frame no
    /// more than the frame. A session holds its frame here while the rest
    /// of it arrives, and doubling past the frame's end left each session
    /// holding up to twice its frame.
    fn grow(&mut self, needed: usize) {
        /// Frames up to this size share a buffer; it grows as any would.
        const SMALL: usize = 8 * 1024;
        let mut capacity = needed.saturating_mul(2).max(SMALL);
        if let Some(header) = self.buf.first_chunk::<LENGTH_PREFIX_BYTES>() {
            let len = u32::from_be_bytes(*header);
            let frame = LENGTH_PREFIX_BYTES + len as usize;
            // Still at most twice what has arrived: a length field alone
            // reserves nothing.
            if len <= self.max_frame_bytes && frame > SMALL {
                capacity = capacity.min(frame.max(needed));
            }
        }
        let mut grown = BytesMut::with_capacity(capacity);
        grown.extend_from_slice(&self.buf);
        self.buf = grown;
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes the buffer has room for.
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    ///
    /// Oversized lengths and unknown types are reported as soon as the
    /// header and type byte are in, without waiting for (or buffering) the
    /// body, so a peer cannot make the receiver hold a huge frame.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        match self.try_next() {
            Ok(frame) => Ok(frame),
            Err(err) => {
                self.failed = Some(err.clone());
                // Nothing more will be decoded; release the memory now.
                self.buf = BytesMut::new();
                Err(err)
            }
        }
    }

    fn try_next(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let Some(header) = self.buf.first_chunk::<LENGTH_PREFIX_BYTES>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*header);
        if len == 0 {
            return Err(ProtocolError::protocol(format!(
                "frame at byte offset {} has length 0; a frame holds at least its type byte",
                self.offset
            )));
        }
        if len > self.max_frame_bytes {
            return Err(ProtocolError::new(
                ErrorCode::FrameTooLarge,
                format!(
                    "frame at byte offset {} is {len} bytes long; the limit is {}",
                    self.offset, self.max_frame_bytes
                ),
            ));
        }
        let Some(&type_byte) = self.buf.get(LENGTH_PREFIX_BYTES) else {
            return Ok(None);
        };
        let Some(ty) = FrameType::from_u8(type_byte) else {
            return Err(ProtocolError::protocol(format!(
                "unknown frame type 0x{type_byte:02x} at byte offset {}",
                self.offset + LENGTH_PREFIX_BYTES as u64
            )));
        };
        // `len` is at most `max_frame_bytes`, a u32, so this fits any usize
        // Tributary runs on (64-bit).
        let total = LENGTH_PREFIX_BYTES + len as usize;
        if self.buf.len() < total {
            // No reserving `total` up front: a peer could then make every
            // connection allocate the maximum with five bytes.
            return Ok(None);
        }
        let start = self.offset;
        let frame = self.buf.split_to(total).freeze();
        self.offset += total as u64;
        let body = frame.slice(LENGTH_PREFIX_BYTES + 1..);
        Frame::decode_body(ty, body, start).map(Some)
    }

    /// Checks that the stream ended on a frame boundary; call it when the
    /// peer finishes the stream.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let have = self.buf.len();
        let detail = match self.buf.first_chunk::<LENGTH_PREFIX_BYTES>() {
            Some(header) => format!(
                "{} of {} bytes received",
                have,
                LENGTH_PREFIX_BYTES as u64 + u64::from(u32::from_be_bytes(*header))
            ),
            None => format!("{have} of the {LENGTH_PREFIX_BYTES} length bytes received"),
        };
        Err(ProtocolError::protocol(format!(
            "stream ended inside the frame at byte offset {}: {detail}",
            self.offset
        )))
    }
}

impl Extend<u8> for FrameDecoder {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        if self.failed.is_none() {
            self.buf.extend(iter);
        }
    }
}

impl<'a> Extend<&'a u8> for FrameDecoder {
    fn extend<I: IntoIterator<Item = &'a u8>>(&mut self, iter: I) {
        self.extend(iter.into_iter().copied());
    }
}
