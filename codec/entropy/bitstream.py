"""The compressed file: a small versioned header, the range coder's words, a CRC32 of everything before it.

    offset  size  field
    0       4     magic b"LCDC"
    4       1     format version (1)
    5       1     model kind (0 factorized, 1 context)
    6       8     codec identity (codec.network.model.codec_identity, 16 hex digits as 8 bytes)
    14      8     probability model identity (codec.entropy.models.model_identity, likewise)
    22      4+4   image height, width (uint32)
    30      2x3   latent channels, height, width (uint16)
    36      4     step Δ (float32), in the model's normalised latent units
    40      2+2   symbol range low, high (int16): the coder's alphabet
    44      4     first 4 bytes of sha256 of the symbols (int32), checked after decoding
    48      4     payload length in bytes (uint32)
    52      n     payload: the range coder's uint32 words, little-endian
    52+n    4     CRC32 (zlib) of bytes 0 .. 52+n-1

All integers little-endian; 56 bytes of overhead in all. Every way a file can be wrong is a BitstreamError (a
ConfigError: one line, exit 2 in the scripts) that names the file.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from codec.common.config import ConfigError

MAGIC = b"LCDC"
VERSION = 1
KIND_CODES = {"factorized": 0, "context": 1}
_HEADER = struct.Struct("<4sBB8s8sIIHHHfhh4sI")
_CRC = struct.Struct("<I")
OVERHEAD_BYTES = _HEADER.size + _CRC.size


class BitstreamError(ConfigError):
    """A compressed file that is truncated, corrupted, not ours, or needs another codec or model."""


@dataclass(frozen=True)
class Header:
    kind: str
    codec_identity: str  # 16 hex digits
    model_identity: str  # 16 hex digits
    height: int
    width: int
    latent_shape: tuple[int, int, int]
    step: float  # as stored: a float32 value
    low: int
    high: int
    symbols_hash: bytes  # 4 bytes


def pack(header: Header, words: np.ndarray) -> bytes:
    """The whole file: header, payload, CRC32."""
    payload = np.asarray(words, dtype="<u4").tobytes()
    body = _HEADER.pack(MAGIC, VERSION, KIND_CODES[header.kind], bytes.fromhex(header.codec_identity),
                        bytes.fromhex(header.model_identity), header.height, header.width, *header.latent_shape,
                        header.step, header.low, header.high, header.symbols_hash, len(payload)) + payload
    return body + _CRC.pack(zlib.crc32(body))


def unpack(data: bytes, source: str) -> tuple[Header, np.ndarray]:
    """(header, words) of a file's bytes; refuses, naming `source`, anything that is not an intact file of ours."""
    if len(data) < len(MAGIC) and MAGIC.startswith(data):
        raise BitstreamError(f"{source}: truncated ({len(data)} bytes)")
    if data[: len(MAGIC)] != MAGIC:
        raise BitstreamError(f"{source}: not a compressed image of this codec toolkit (no {MAGIC.decode()} magic); "
                             f"`latent-codec compress` writes them")
    if len(data) < OVERHEAD_BYTES:
        raise BitstreamError(f"{source}: truncated ({len(data)} bytes, shorter than the {OVERHEAD_BYTES}-byte header "
                             f"and checksum)")
    fields = _HEADER.unpack_from(data)
    version, kind_code = fields[1], fields[2]
    payload_bytes = fields[-1]
    expected = _HEADER.size + payload_bytes + _CRC.size
    if len(data) < expected:
        raise BitstreamError(f"{source}: truncated ({len(data)} bytes; its header announces {expected})")
    if len(data) > expected:
        raise BitstreamError(f"{source}: {len(data) - expected} bytes of trailing data after the checksum; the file "
                             f"is damaged or was concatenated with another")
    (crc,) = _CRC.unpack_from(data, expected - _CRC.size)
    if zlib.crc32(data[: expected - _CRC.size]) != crc:
        raise BitstreamError(f"{source}: corrupted (CRC32 mismatch); the file was changed after it was written")
    if version != VERSION:
        raise BitstreamError(f"{source}: format version {version}; this toolkit reads version {VERSION}")
    kinds = {code: kind for kind, code in KIND_CODES.items()}
    if kind_code not in kinds or payload_bytes % 4:
        raise BitstreamError(f"{source}: corrupted header (model kind {kind_code}, payload of {payload_bytes} bytes)")
    _, _, _, codec, model, height, width, channels, h, w, step, low, high, digest, _ = fields
    header = Header(kinds[kind_code], codec.hex(), model.hex(), height, width, (channels, h, w), step, low, high,
                    digest)
    words = np.frombuffer(data, dtype="<u4", count=payload_bytes // 4, offset=_HEADER.size).astype(np.uint32)
    return header, words
