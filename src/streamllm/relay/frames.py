"""The relay's binary frame format (pure: bytes in, values out; no I/O, no crypto).

    offset  size  field
    0       1     version (1)
    1       1     type       DATA, FINAL, ERROR or CANCEL
    2       1     direction  0 = producer to consumer (down), 1 = consumer to producer (up)
    3       1     flags      bit 0: payload is sealed (AES-256-GCM)
    4       8     channel tag: first 8 bytes of SHA-256(channel id), so a frame spliced in from
                  another channel is recognised before any decryption is tried
    12      8     sequence number, big-endian, per channel and direction, starting at 0
    20      4     payload length, big-endian
    24      ...   payload (ciphertext and 16-byte tag when sealed)

The relay reads only this header (to route, bound and resume); the payload is opaque to it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

from streamllm.errors import RelayFrameInvalid

VERSION = 1
HEADER = struct.Struct(">BBBB8sQI")
HEADER_SIZE = HEADER.size  # 24
FLAG_SEALED = 0x01
MAX_PAYLOAD = 1 << 20  # a frame carries a few tokens; a megabyte is already generous


class FrameType(IntEnum):
    DATA = 1  # one or more deltas of the answer
    FINAL = 2  # the last frame of a direction: carries how many frames came before it
    ERROR = 3  # the backend failed; carries the error
    CANCEL = 4  # consumer to producer: stop generating


class Direction(IntEnum):
    DOWN = 0  # producer (worker) to consumer (gateway)
    UP = 1  # consumer to producer


def channel_tag(channel: str) -> bytes:
    return hashlib.sha256(channel.encode()).digest()[:8]


@dataclass(frozen=True)
class Header:
    type: FrameType
    direction: Direction
    sealed: bool
    tag: bytes
    seq: int
    length: int

    def pack(self) -> bytes:
        flags = FLAG_SEALED if self.sealed else 0
        return HEADER.pack(
            VERSION, self.type, self.direction, flags, self.tag, self.seq, self.length
        )


def encode(header: Header, payload: bytes) -> bytes:
    if len(payload) != header.length:
        raise RelayFrameInvalid("payload length does not match the header")
    if header.length > MAX_PAYLOAD:
        raise RelayFrameInvalid(f"payload of {header.length} bytes exceeds {MAX_PAYLOAD}")
    return header.pack() + payload


def decode_header(frame: bytes, max_payload: int = MAX_PAYLOAD) -> Header:
    """Parse and check a frame's header; the relay calls only this."""
    if len(frame) < HEADER_SIZE:
        raise RelayFrameInvalid(f"frame of {len(frame)} bytes is shorter than its header")
    version, type_, direction, flags, tag, seq, length = HEADER.unpack_from(frame)
    if version != VERSION:
        raise RelayFrameInvalid(f"unknown frame version {version}")
    try:
        ftype, fdir = FrameType(type_), Direction(direction)
    except ValueError:
        raise RelayFrameInvalid(f"unknown frame type {type_} or direction {direction}") from None
    if flags & ~FLAG_SEALED:
        raise RelayFrameInvalid(f"unknown frame flags {flags:#x}")
    if length > max_payload:
        raise RelayFrameInvalid(f"payload of {length} bytes exceeds the {max_payload} limit")
    if len(frame) != HEADER_SIZE + length:
        raise RelayFrameInvalid("frame length does not match its header")
    return Header(ftype, fdir, bool(flags & FLAG_SEALED), tag, seq, length)


def decode(frame: bytes, max_payload: int = MAX_PAYLOAD) -> tuple[Header, bytes]:
    header = decode_header(frame, max_payload)
    return header, frame[HEADER_SIZE:]
