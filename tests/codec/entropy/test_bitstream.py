"""The file: symbols survive the coder bit for bit, the file costs the model's cross-entropy plus the header, and
every damaged, foreign or mismatched file is refused with one line naming it."""

from __future__ import annotations

import struct
import zlib

import constriction
import numpy as np
import pytest
import torch

from codec.entropy.bitstream import OVERHEAD_BYTES, BitstreamError, Header, pack, unpack
from codec.entropy.coder import compress_latent, decompress_symbols, encode_latent, read_compressed
from codec.entropy.models import load_model
from codec.entropy.symbols import (
    categorical_probability,
    decode_symbols,
    encode_symbols,
    gaussian_probability,
    quantize,
    symbol_bits,
)
from codec.network.model import codec_identity, load_codec
from tests.codec.entropy.conftest import KINDS, MODELS

SOURCE = "photo.lcc"


@pytest.fixture(scope="module")
def codec(tiny_codec_dir):
    vae = load_codec(tiny_codec_dir)
    return vae, codec_identity(vae)


@pytest.fixture(scope="module")
def latent(codec, bundled_dir):
    """The posterior mean of a 256x192 photo crop (a 4x24x32 latent) and the image size."""
    from PIL import Image

    image = Image.open(next(bundled_dir.glob("*/chelsea.png"))).convert("RGB").crop((100, 50, 356, 242))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before one_torch_thread
    try:
        return encode_latent(codec[0], image)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(model_files):
    return {kind: load_model(path) for kind, path in model_files.items()}


def one_line(exc: pytest.ExceptionInfo, source: str = SOURCE) -> str:
    message = str(exc.value)
    assert "\n" not in message and source in message
    return message


@pytest.mark.parametrize("kind", MODELS)
def test_symbols_round_trip_bit_for_bit(models, latent, kind):
    model = models[kind]
    z_norm = model.normalise(latent[0])
    for step in (0.05, 0.4, 2.0):
        y = quantize(z_norm, step)
        y[0, 0, 0] = 3000  # far outside anything the model expects: still codable, at ~24 bits
        low, high = int(y.min()), int(y.max())
        decoded = decode_symbols(model, encode_symbols(model, y, step, low, high), tuple(y.shape), step, low, high)
        assert decoded.dtype == y.dtype and torch.equal(decoded, y)


@pytest.mark.parametrize("kind", KINDS)
def test_a_constant_latent_costs_no_payload(models, kind):
    y = torch.full((4, 3, 5), -2, dtype=torch.int64)
    words = encode_symbols(models[kind], y, 1.0, -2, -2)
    assert len(words) == 0 and symbol_bits(models[kind], y, 1.0, -2, -2) == 0.0
    assert torch.equal(decode_symbols(models[kind], words, (4, 3, 5), 1.0, -2, -2), y)


def payload_bits(encode) -> int:
    encoder = constriction.stream.queue.RangeEncoder()
    encode(encoder)
    return 32 * len(encoder.get_compressed())


@pytest.mark.parametrize("data_std, model_std", [(0.3, 1.0), (1.0, 0.1), (3.0, 0.3)])
@pytest.mark.parametrize("step", [0.05, 1.0])
def test_gaussian_bits_are_what_constriction_pays(data_std, model_std, step):
    """20,000 symbols of N(0, data_std²) coded under Gaussians of std model_std: too wide (the tails' mass lands on
    the edge symbols) or too narrow (most symbols at the coder's floor, some symbol near 8σ given two units), at a
    fine and a coarse step. The counted bits are the payload's to within the coder's last words and its rounding of
    the range to whole units (≤ 2^-8 of a symbol's interval, ~0.03% here where most symbols cost 24 bits)."""
    rng = np.random.default_rng(0)
    y = np.round(rng.normal(0.0, data_std, 20000) / step).astype(np.int32)
    mean, std = rng.normal(0.0, 0.1, len(y)) / step, np.full(len(y), model_std / step)
    low, high = int(y.min()), int(y.max())
    paid = payload_bits(lambda e: e.encode(y, constriction.stream.model.QuantizedGaussian(low, high), mean, std))
    p = gaussian_probability(torch.from_numpy(y).double(), low, high, torch.from_numpy(mean), torch.from_numpy(std))
    counted = float(-torch.log2(p).sum())
    assert paid > 20000 and 0 <= paid - counted <= 64 + 0.001 * paid, (paid, counted)


def test_categorical_bits_are_what_constriction_pays():
    """Tables with entries from 2^-20 to ~1, and symbols drawn uniformly (most where the table put little)."""
    rng = np.random.default_rng(0)
    tables = np.exp(rng.normal(0.0, 4.0, (3, 40)))
    tables = np.maximum(tables / tables.sum(-1, keepdims=True), 2.0**-20)
    tables /= tables.sum(-1, keepdims=True)
    index = rng.integers(0, 40, (3, 5000))

    def encode(encoder):
        for table, row in zip(tables, index):
            encoder.encode(row.astype(np.int32), constriction.stream.model.Categorical(table, perfect=False))

    paid = payload_bits(encode)
    counted = float(-torch.log2(categorical_probability(torch.from_numpy(tables), torch.from_numpy(index))).sum())
    assert paid > 20000 and 0 <= paid - counted <= 64 + 0.001 * paid, (paid, counted)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("step", [0.05, 0.5])
@pytest.mark.parametrize("spread", [1.0, 0.3, 3.0])
def test_file_costs_the_cross_entropy_plus_the_header(models, latent, codec, kind, step, spread):
    """The reported bits are the payload's, at fine and coarse Δ, for the latent the models were fit on and for it
    scaled to 0.3x (the model predicts too wide: the mass it puts past the symbol range goes to the two edge
    symbols, it is not renormalised away) and to 3x (too narrow: many symbols at the coder's floor)."""
    model = models[kind]
    z, size = latent
    z_norm = model.normalise(z).repeat(1, 4, 4) * spread  # 16 copies: enough bits at Δ 0.5 for a tight check
    compressed = compress_latent(model, z_norm, step, size, codec[1], SOURCE)
    payload = compressed.bits - 8 * OVERHEAD_BYTES
    assert payload > 32000  # the coder's last words (≤ 64 bits) stay under 0.2%
    assert abs(payload - compressed.model_bits) <= 0.002 * payload, (payload, compressed.model_bits)
    y = quantize(z_norm, compressed.step)
    assert compressed.model_bits == symbol_bits(model, y, compressed.step, int(y.min()), int(y.max()))


@pytest.mark.parametrize("kind", MODELS)
def test_file_round_trips_to_the_encoder_symbols(models, latent, codec, kind):
    model = models[kind]
    compressed = compress_latent(model, model.normalise(latent[0]), 0.3, latent[1], codec[1], SOURCE)
    header, words = read_compressed(compressed.data, SOURCE, model, codec[1], 8)
    # The symbols' shape: the latent's, or its coefficients' (16 bands of 12 x 16 after one Haar split).
    expected = (4, 24, 32) if model.transform is None else (16, 12, 16)
    assert (header.height, header.width, header.latent_shape) == (192, 256, expected)
    assert header.step == np.float32(0.3) and header.kind == model.kind
    assert torch.equal(decompress_symbols(model, header, words, SOURCE), compressed.symbols)


def a_file(step: float = 0.5) -> bytes:
    header = Header("context", "0123456789abcdef", "fedcba9876543210", 37, 53, (4, 5, 7), step, -3, 4,
                    b"\x01\x02\x03\x04")
    return pack(header, np.arange(5, dtype=np.uint32))


def test_header_is_small_and_round_trips():
    data = a_file()
    assert len(data) == OVERHEAD_BYTES + 20 and OVERHEAD_BYTES == 56
    header, words = unpack(data, SOURCE)
    assert header == Header("context", "0123456789abcdef", "fedcba9876543210", 37, 53, (4, 5, 7), 0.5, -3, 4,
                            b"\x01\x02\x03\x04")
    assert words.tolist() == [0, 1, 2, 3, 4]


def test_truncated_files_are_refused():
    data = a_file()
    for length in (0, 2, 10, OVERHEAD_BYTES - 1, len(data) - 4, len(data) - 1):
        with pytest.raises(BitstreamError) as exc:
            unpack(data[:length], SOURCE)
        assert "truncated" in one_line(exc)


def test_every_flipped_byte_is_refused():
    data = a_file()
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x20
        with pytest.raises(BitstreamError) as exc:
            unpack(bytes(damaged), SOURCE)
        one_line(exc)


def test_foreign_and_future_files_are_refused(caption_images):
    png = (caption_images / "chelsea.png").read_bytes()
    with pytest.raises(BitstreamError) as exc:
        unpack(png, SOURCE)
    assert "not a compressed image" in one_line(exc)
    body = bytearray(a_file()[:-4])
    body[4] = 2  # a later format version, with a valid checksum
    with pytest.raises(BitstreamError) as exc:
        unpack(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))), SOURCE)
    assert "version 2" in one_line(exc)
    with pytest.raises(BitstreamError) as exc:
        unpack(a_file() + b"\x00", SOURCE)
    assert "trailing" in one_line(exc)


def test_a_file_of_another_codec_or_model_is_refused(models, latent, codec):
    compressed = compress_latent(models["context"], models["context"].normalise(latent[0]), 0.5, latent[1], codec[1],
                                 SOURCE)
    with pytest.raises(BitstreamError) as exc:
        read_compressed(compressed.data, SOURCE, models["context"], "00" * 8, 8)
    assert "codec" in one_line(exc) and codec[1] in one_line(exc)
    with pytest.raises(BitstreamError) as exc:
        read_compressed(compressed.data, SOURCE, models["factorized"], codec[1], 8)
    assert models["context"].identity in one_line(exc) and models["factorized"].path in one_line(exc)


def test_a_decode_that_went_wrong_is_caught_by_the_symbol_hash(model_files, latent, codec):
    """A model whose numbers differ from the encoder's but whose identity does not (what a nondeterministic
    platform would look like): the file decodes to other symbols, and the hash refuses them."""
    model = load_model(model_files["context"])
    compressed = compress_latent(model, model.normalise(latent[0]), 0.2, latent[1], codec[1], SOURCE)
    header, words = read_compressed(compressed.data, SOURCE, model, codec[1], 8)
    with torch.no_grad():
        model.network.nets[1][-1].bias += 0.5
    with pytest.raises(BitstreamError) as exc:
        decompress_symbols(model, header, words, SOURCE)
    assert "hash" in one_line(exc)


@pytest.mark.parametrize("kind", KINDS)
def test_a_payload_no_encoder_wrote_is_refused(models, codec, kind):
    """Random words decode to symbols the hash refuses; words the range decoder finds invalid (constriction asserts)
    are a one-line refusal too, not a traceback."""
    model = models[kind]
    header = Header(kind, codec[1], model.identity, 16, 16, (4, 2, 2), 0.5, -5, 5, b"\0\0\0\0")
    for seed in range(5):
        words = np.random.default_rng(seed).integers(0, 2**32, 3, dtype=np.uint64).astype(np.uint32)
        with pytest.raises(BitstreamError) as exc:
            decompress_symbols(model, header, words, SOURCE)
        one_line(exc)
    with pytest.raises(BitstreamError) as exc:
        decompress_symbols(model, header, np.full(3, 2**32 - 1, dtype=np.uint32), SOURCE)
    assert "does not decode" in one_line(exc)
