"""End-to-end sealing of relay frames with AES-256-GCM, and the checks on the receiving side.

Pure: no sockets. One `Sealer` per direction on the sending side, one `Opener` per direction on
the receiving side, both built from the request's fresh 256-bit key and its channel id.

- Nonce = direction (4 bytes) + sequence number (8 bytes): never reused under one key, since
  each direction counts up from 0 and the two directions differ in the first bytes.
- Associated data = the frame's whole header + the channel id, so the type, direction, sequence
  number, length and channel are all authenticated with the payload.
- A FINAL frame carries the number of frames sent before it: truncation is detected even when
  the stream is cut exactly at a frame boundary.

Every violation raises its own typed error (streamllm.errors): tampering, replay, reordering or
loss, truncation, splicing from another channel, injected plaintext.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from streamllm.errors import (
    RelayFrameInvalid,
    RelayPlaintext,
    RelayReordered,
    RelayReplayed,
    RelaySpliced,
    RelayTampered,
    RelayTruncated,
)
from streamllm.relay.frames import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Direction,
    FrameType,
    Header,
    channel_tag,
    decode,
    encode,
)

KEY_BYTES = 32
TAG_BYTES = 16
_COUNT = struct.Struct(">Q")


def new_key() -> bytes:
    """A fresh 256-bit key for one request."""
    return os.urandom(KEY_BYTES)


def derive_key(key: bytes, label: str) -> bytes:
    """A key of its own for `label` (say, a channel), from `key`: HKDF-SHA256. Sequence
    numbers, and so nonces, restart on every channel; one key across two channels would reuse
    them."""
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None,
                info=b"streamllm relay channel " + label.encode()).derive(key)


def _nonce(direction: Direction, seq: int) -> bytes:
    return struct.pack(">IQ", direction, seq)


class Sealer:
    """Turns payloads into frames for one direction of one channel."""

    def __init__(self, key: bytes | None, channel: str, direction: Direction):
        if key is not None and len(key) != KEY_BYTES:
            raise ValueError("relay keys are 32 bytes (AES-256)")
        self._aead = AESGCM(key) if key is not None else None
        self._channel = channel.encode()
        self._tag = channel_tag(channel)
        self.direction = direction
        self.seq = 0
        self.finished = False

    def seal(self, type_: FrameType, payload: bytes) -> bytes:
        if self.finished:
            raise RelayFrameInvalid("this direction already sent its final frame")
        sealed = self._aead is not None
        length = len(payload) + (TAG_BYTES if sealed else 0)
        if length > MAX_PAYLOAD:
            raise RelayFrameInvalid(f"payload of {length} bytes exceeds {MAX_PAYLOAD}")
        header = Header(type_, self.direction, sealed, self._tag, self.seq, length)
        self.seq += 1
        if self._aead is not None:
            payload = self._aead.encrypt(
                _nonce(self.direction, header.seq), payload, header.pack() + self._channel
            )
        return encode(header, payload)

    def final(self, payload: bytes = b"") -> bytes:
        """The last frame: how many frames came before it, then an optional payload."""
        frame = self.seal(FrameType.FINAL, _COUNT.pack(self.seq) + payload)
        self.finished = True
        return frame


class Opener:
    """Checks and opens the frames of one direction of one channel, strictly in order."""

    def __init__(
        self, key: bytes | None, channel: str, direction: Direction, require_sealed: bool = True
    ):
        if key is None and require_sealed:
            raise ValueError("a key is needed when sealed frames are required")
        self._aead = AESGCM(key) if key is not None else None
        self._channel = channel.encode()
        self._tag = channel_tag(channel)
        self.direction = direction
        self.require_sealed = require_sealed
        self.next_seq = 0
        self.finished = False

    def open(self, frame: bytes) -> tuple[FrameType, bytes]:
        header, body = decode(frame)
        if header.direction != self.direction:
            raise RelayTampered(f"frame for direction {header.direction.name} arrived here")
        if header.tag != self._tag:
            raise RelaySpliced("frame belongs to another channel")
        if header.sealed:
            if self._aead is None:
                raise RelayFrameInvalid("sealed frame on a channel without a key")
            try:
                payload = self._aead.decrypt(
                    _nonce(header.direction, header.seq), body, frame[:HEADER_SIZE] + self._channel
                )
            except InvalidTag:
                raise RelayTampered(f"frame {header.seq} failed authentication") from None
        elif self.require_sealed:
            raise RelayPlaintext(f"unsealed frame {header.seq} on an encrypted channel")
        else:
            payload = body
        # Authentic from here on: the sequence number is the sender's own.
        if header.seq < self.next_seq:
            raise RelayReplayed(f"frame {header.seq} was already received")
        if self.finished:
            raise RelayFrameInvalid("frame after the final frame")
        if header.seq > self.next_seq:
            raise RelayReordered(
                f"frame {header.seq} arrived while frame {self.next_seq} is missing"
            )
        self.next_seq += 1
        if header.type is FrameType.FINAL:
            if len(payload) < _COUNT.size:
                raise RelayTruncated("final frame without its count")
            (count,) = _COUNT.unpack_from(payload)
            if count != header.seq:
                raise RelayTruncated(f"sender sent {count} frames, {header.seq} arrived")
            self.finished = True
            payload = payload[_COUNT.size :]
        return header.type, payload

    def end(self) -> None:
        """The stream is over: it must have ended with its final frame."""
        if not self.finished:
            raise RelayTruncated(
                f"stream ended after {self.next_seq} frames without its final frame"
            )
