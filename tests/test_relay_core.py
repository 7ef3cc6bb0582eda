"""The relay's sans-I/O core: frames, sealing and tokens, attacked the way a hostile relay would."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamllm.errors import (
    RelayFrameInvalid,
    RelayPlaintext,
    RelayReordered,
    RelayReplayed,
    RelaySpliced,
    RelayTampered,
    RelayTruncated,
    TokenRejected,
)
from streamllm.relay import frames
from streamllm.relay.crypto import Opener, Sealer, new_key
from streamllm.relay.frames import HEADER_SIZE, Direction, FrameType
from streamllm.relay.tokens import TokenVerifier, mint

DOWN = Direction.DOWN
SECRET_TOKEN = "zebra-quartz-7731"  # a token string that must never appear on the wire


def produce(key, channel="chan-a", texts=("Hello", " world", f" {SECRET_TOKEN}")):
    sealer = Sealer(key, channel, DOWN)
    out = [sealer.seal(FrameType.DATA, json.dumps({"content": t}).encode()) for t in texts]
    out.append(sealer.final(b'{"finish_reason":"stop"}'))
    return out


def consume(key, wire, channel="chan-a"):
    opener = Opener(key, channel, DOWN)
    got = [opener.open(frame) for frame in wire]
    opener.end()
    return got


def test_round_trip_and_payload_is_opaque_on_the_wire():
    key = new_key()
    wire = produce(key)
    got = consume(key, wire)
    assert [t for t, _ in got] == [FrameType.DATA] * 3 + [FrameType.FINAL]
    assert "".join(json.loads(p)["content"] for t, p in got[:3]) == f"Hello world {SECRET_TOKEN}"
    assert got[-1][1] == b'{"finish_reason":"stop"}'
    for frame in wire:
        assert SECRET_TOKEN.encode() not in frame and b"Hello" not in frame


@given(st.lists(st.binary(max_size=64), min_size=1, max_size=8))
def test_round_trip_any_payloads(payloads):
    key = new_key()
    sealer, opener = Sealer(key, "c", DOWN), Opener(key, "c", DOWN)
    for p in payloads:
        assert opener.open(sealer.seal(FrameType.DATA, p)) == (FrameType.DATA, p)
    assert opener.open(sealer.final()) == (FrameType.FINAL, b"")
    opener.end()


@pytest.mark.parametrize("offset", [0, 1, 3, 5, 12, 19, 23, HEADER_SIZE, -1])
def test_any_flipped_byte_is_rejected(offset):
    key = new_key()
    wire = produce(key)
    frame = bytearray(wire[1])
    frame[offset] ^= 0x40
    opener = Opener(key, "chan-a", DOWN)
    opener.open(wire[0])
    with pytest.raises((RelayTampered, RelayFrameInvalid, RelaySpliced, RelayPlaintext)):
        opener.open(bytes(frame))


def test_payload_tampering_is_tampered():
    key = new_key()
    wire = produce(key)
    frame = bytearray(wire[0])
    frame[-1] ^= 1
    with pytest.raises(RelayTampered):
        consume(key, [bytes(frame)] + wire[1:])


def test_replay_reorder_drop_and_truncation_are_each_named():
    key = new_key()
    wire = produce(key)
    with pytest.raises(RelayReplayed):
        consume(key, [wire[0], wire[0]] + wire[1:])
    with pytest.raises(RelayReordered):
        consume(key, [wire[1], wire[0]] + wire[2:])
    with pytest.raises(RelayReordered):
        consume(key, [wire[0], wire[2], wire[3]])  # frame 1 dropped
    with pytest.raises(RelayTruncated):
        consume(key, wire[:-1])  # cut at a frame boundary, final frame never came
    with pytest.raises(RelayReplayed):
        consume(key, wire + [wire[-1]])


def test_a_final_frame_cannot_be_moved_forward():
    key = new_key()
    sealer = Sealer(key, "chan-a", DOWN)
    sealer.seal(FrameType.DATA, b"x")
    honest_final = sealer.final()
    # A relay cannot build a FINAL at seq 0 without the key; the real one names count 1.
    opener = Opener(key, "chan-a", DOWN)
    with pytest.raises(RelayReordered):
        opener.open(honest_final)


def test_splice_from_another_channel_is_detected_even_with_a_rewritten_tag():
    key_a, key_b = new_key(), new_key()
    wire_b = produce(key_b, channel="chan-b")
    with pytest.raises(RelaySpliced):
        consume(key_a, wire_b[:1], channel="chan-a")
    # Rewriting the channel tag to match does not help: the channel is authenticated.
    forged = bytearray(wire_b[0])
    forged[4:12] = frames.channel_tag("chan-a")
    with pytest.raises(RelayTampered):
        consume(key_a, [bytes(forged)], channel="chan-a")
    # Same key reused across channels (it never is) would still be caught by the binding.
    wire_same_key = produce(key_a, channel="chan-b")
    forged = bytearray(wire_same_key[0])
    forged[4:12] = frames.channel_tag("chan-a")
    with pytest.raises(RelayTampered):
        consume(key_a, [bytes(forged)], channel="chan-a")


def test_injected_plaintext_is_rejected():
    key = new_key()
    plain = Sealer(None, "chan-a", DOWN).seal(FrameType.DATA, b'{"content":"injected"}')
    with pytest.raises(RelayPlaintext):
        consume(key, [plain])


def test_wrong_direction_and_malformed_frames():
    key = new_key()
    up = Sealer(key, "chan-a", Direction.UP).seal(FrameType.CANCEL, b"")
    with pytest.raises(RelayTampered):
        Opener(key, "chan-a", DOWN).open(up)
    for junk in (b"", b"\x01" * 10, b"\x09" + bytes(30)):
        with pytest.raises(RelayFrameInvalid):
            Opener(key, "chan-a", DOWN).open(junk)
    with pytest.raises(RelayFrameInvalid):
        frames.decode_header(produce(key)[0], max_payload=8)


def test_nonces_never_repeat_within_a_key():
    key = new_key()
    down, up = Sealer(key, "c", DOWN), Sealer(key, "c", Direction.UP)
    seen = set()
    for _ in range(200):
        for s in (down, up):
            f = s.seal(FrameType.DATA, b"")
            h = frames.decode_header(f)
            nonce = (h.direction, h.seq)
            assert nonce not in seen
            seen.add(nonce)


# -- capability tokens ---------------------------------------------------------------------------


def test_tokens_are_per_channel_per_role_expiring_and_single_use():
    secret = b"s" * 32
    verifier = TokenVerifier(secret)
    tok = mint(secret, "chan-a", "producer", ttl_s=30, now=1000)
    assert verifier.verify(tok, "chan-a", "producer", now=1010).channel == "chan-a"
    with pytest.raises(TokenRejected, match="already used"):
        verifier.verify(tok, "chan-a", "producer", now=1011)
    with pytest.raises(TokenRejected, match="another channel"):
        TokenVerifier(secret).verify(tok, "chan-b", "producer", now=1010)
    with pytest.raises(TokenRejected, match="role"):
        TokenVerifier(secret).verify(tok, "chan-a", "consumer", now=1010)
    with pytest.raises(TokenRejected, match="expired"):
        TokenVerifier(secret).verify(tok, "chan-a", "producer", now=1031)
    with pytest.raises(TokenRejected, match="signature"):
        TokenVerifier(b"x" * 32).verify(tok, "chan-a", "producer", now=1010)
    body, mac = tok.split(".")
    forged_body = body[:-2] + ("AA" if body[-2:] != "AA" else "BB")
    with pytest.raises(TokenRejected):
        TokenVerifier(secret).verify(f"{forged_body}.{mac}", "chan-a", "producer", now=1010)
    for junk in ("", "abc", "a.b.c", "....", "x.y"):
        with pytest.raises(TokenRejected):
            TokenVerifier(secret).verify(junk, "chan-a", "producer", now=1010)
