"""Update compression: codecs for the delta ``local - global`` a client sends, registered by name.

A :class:`Codec` turns a delta ``{name: ndarray}`` into a :data:`Payload` (field -> array) and
back; ``decode`` gets the reference arrays the receiver knows (the global model it sent), so
shapes and sizes come from the receiver, never from the payload, and every field is checked
against them (:class:`PayloadError` names the field). The built-in codecs work on the model's
float arrays as one vector (:class:`VectorCodec`); integer arrays (counters such as
``num_batches_tracked``) travel losslessly as ``raw.<key>`` fields.

Codecs (``compression.codec``), bytes relative to float32 (npy headers aside):

* ``fp16`` / ``bf16``: a cast, 50 %; relative error <= 2^-11 (fp16, within its range) / 2^-8 (bf16).
* ``int8`` / ``int4``: blockwise absmax quantisation (Dettmers et al., "8-bit Optimizers via
  Block-wise Quantization", ICLR 2022): per block of ``block-size`` values a float32 scale
  ``s = absmax / L`` and codes ``rint(x / s)`` in ``[-L, L]`` (L = 127, or 7 packed two per byte),
  so ``|x - decoded| <= s / 2``; 25 % / 12.5 %, plus 4 bytes per block.
* ``topk``: the ``ceil(top-k-fraction * n)`` largest-magnitude values of the model's n with
  their int32 indices, 8 bytes each, with error feedback (:attr:`Codec.error_feedback`): what was not
  sent is the client's residual, added to its next delta (Seide et al., "1-bit SGD", Interspeech
  2014; Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019).
* ``rotation``: a random rotation, then ``bits``-bit stochastic quantisation (Suresh et al.,
  "Distributed Mean Estimation with Limited Communication", ICML 2017): per chunk of 2^16 values
  (the tail cut into power-of-two pieces, the last padded), random signs and an orthonormal Walsh-Hadamard
  transform spread the vector's energy evenly over the coordinates, which are then rounded
  stochastically (unbiased: E[decoded] = delta) to ``2^bits`` levels over ``[-m, m]``, m the
  chunk's largest rotated magnitude. ``bits / 32`` of the bytes plus 4 per chunk and the 8-byte
  seed of the signs (not a secret: the rotation only conditions the quantisation). The same
  rotation and integer codes are what secure aggregation sums (TFF's ``DistributedDpSumFactory``).

Under sample-level DP (DP-SGD on the client) a codec is post-processing of the already-private
update (the residual is a function of earlier private updates too), so it changes no privacy
accounting.

Wire form (:func:`to_records`/:func:`from_records`): the reply's ``"arrays"`` ArrayRecord is
replaced by the ArrayRecord ``"fedvault.compressed"`` (one array per field) and the ConfigRecord
``"fedvault.compression"`` ``{"codec": name}``.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedvault.config import CompressionConfig

NDArrays = dict[str, np.ndarray]
Payload = dict[str, np.ndarray]  # field -> array

COMPRESSION = "fedvault.compression"
COMPRESSED = "fedvault.compressed"
RAW_PREFIX = "raw."


class PayloadError(ValueError):
    """A compressed payload that cannot be decoded against the reference; names the field."""


class Codec(Protocol):
    """Encodes a delta into a payload and decodes it against the reference arrays (same keys, shapes)."""

    name: str
    error_feedback: bool  # True: the client keeps what was not sent and adds it to its next delta

    def encode(self, delta: Mapping[str, np.ndarray]) -> Payload: ...

    def decode(self, payload: Payload, like: Mapping[str, np.ndarray]) -> NDArrays: ...


class VectorCodec:
    """A codec of the model's floating-point arrays as one float32 vector (concatenated in key order,
    so a payload is a few arrays, whatever the model); integer arrays go raw, as ``raw.<key>``."""

    error_feedback = False
    fields: tuple[str, ...] = ()

    def __init__(self, name: str) -> None:
        self.name = name

    def encode_vector(self, flat: np.ndarray) -> Payload:
        raise NotImplementedError

    def decode_vector(self, payload: Payload, size: int) -> np.ndarray:
        """The float32 vector of ``size`` values; raises PayloadError naming a bad field."""
        raise NotImplementedError

    def encode(self, delta: Mapping[str, np.ndarray]) -> Payload:
        floats = [np.asarray(v, np.float32).reshape(-1) for v in delta.values() if _is_float(v)]
        flat = floats[0] if len(floats) == 1 else np.concatenate(floats or [np.zeros(0, np.float32)])
        payload = self.encode_vector(flat)
        payload.update({RAW_PREFIX + k: np.asarray(v) for k, v in delta.items() if not _is_float(v)})
        return payload

    def decode(self, payload: Payload, like: Mapping[str, np.ndarray]) -> NDArrays:
        raw = {RAW_PREFIX + k: v for k, v in like.items() if not _is_float(v)}
        if missing := sorted({*self.fields, *raw} - set(payload)):
            raise PayloadError(f"missing field(s) {missing}")
        if extra := sorted(set(payload) - {*self.fields, *raw}):
            raise PayloadError(f"unexpected field(s) {extra}")
        for field, ref in raw.items():
            if payload[field].size != ref.size or payload[field].dtype != ref.dtype:
                raise PayloadError(f"field '{field}' is {_described(payload[field])}, expected {_described(ref)}")
        floats = {k: v for k, v in like.items() if _is_float(v)}
        flat = self.decode_vector({f: payload[f] for f in self.fields}, sum(v.size for v in floats.values()))
        decoded, start = {}, 0
        for key, ref in like.items():
            if key in floats:
                decoded[key] = flat[start : start + ref.size].reshape(ref.shape).astype(ref.dtype, copy=False)
                start += ref.size
            else:
                decoded[key] = payload[RAW_PREFIX + key].reshape(ref.shape)
        return decoded


def _is_float(value: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def _described(value: np.ndarray) -> str:
    return f"{value.dtype}{list(value.shape)}"


def _expect(payload: Payload, field: str, dtype: type, size: int) -> np.ndarray:
    """``payload[field]``, checked to be a vector of ``size`` values of ``dtype``."""
    value = payload[field]
    if value.dtype != dtype or value.shape != (size,):
        raise PayloadError(f"field '{field}' is {_described(value)}, expected {np.dtype(dtype)}[{size}]")
    return value


class CastCodec(VectorCodec):
    """A cast to a 16-bit float (IEEE half, or bfloat16 carried as its uint16 bit pattern)."""

    fields = ("values",)

    def __init__(self, name: str, dtype: torch.dtype, wire: type) -> None:
        super().__init__(name)
        self.dtype, self.wire = dtype, wire

    def encode_vector(self, flat: np.ndarray) -> Payload:
        cast = torch.from_numpy(flat).to(self.dtype)  # round to nearest even
        return {"values": cast.view(torch.int16).numpy().view(self.wire)}

    def decode_vector(self, payload: Payload, size: int) -> np.ndarray:
        bits = torch.from_numpy(_expect(payload, "values", self.wire, size).view(np.int16).copy())
        return bits.view(self.dtype).to(torch.float32).numpy()


def _blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``x`` as a (full blocks, block) view and its tail (the last, shorter block; maybe empty)."""
    full = x.size // block * block
    return x[:full].reshape(-1, block), x[full:]


def _scale_blocks(x: np.ndarray, factors: np.ndarray, block: int, out: np.ndarray) -> np.ndarray:
    """``out = x * factors[b]`` for each block b of ``x`` (one pass, no padded copy)."""
    head, tail = _blocks(x, block)
    out_head, out_tail = _blocks(out, block)
    np.multiply(head, factors[: len(head), None], out=out_head)
    if tail.size:
        np.multiply(tail, factors[-1], out=out_tail)
    return out


#: Values quantised per pass: a chunk and its float32 temporary stay in cache, so each value is read
#: from memory once (an even number of blocks, so nibble-packed chunks start on a byte).
CHUNK_VALUES = 1 << 16


class BlockwiseAbsmax(VectorCodec):
    """Blockwise absmax quantisation to ``levels`` signed levels (Dettmers et al., ICLR 2022):
    ``s_b = max|x_b| / L``, ``q = rint(x / s_b)``, decoded ``q s_b``, error <= ``s_b / 2``.
    ``nibbles``: codes packed two per byte as ``q + 8`` (L <= 7). Vectorised chunk by chunk."""

    fields = ("codes", "scales")

    def __init__(self, name: str, levels: int, block: int, nibbles: bool) -> None:
        super().__init__(name)
        self.levels, self.block, self.nibbles = levels, block, nibbles
        self.step = block * max(2, CHUNK_VALUES // block // 2 * 2)

    def encode_vector(self, flat: np.ndarray) -> Payload:
        scales = np.empty(math.ceil(flat.size / self.block), np.float32)
        codes = np.empty(math.ceil(flat.size / 2) if self.nibbles else flat.size, np.uint8 if self.nibbles else np.int8)
        scaled = np.empty(min(self.step, flat.size), np.float32)
        for start in range(0, flat.size, self.step):
            x = flat[start : start + self.step]
            head, tail = _blocks(x, self.block)
            absmax = np.maximum(head.max(axis=1, initial=0.0), -head.min(axis=1, initial=0.0))
            if tail.size:
                absmax = np.append(absmax, np.abs(tail).max())
            s = scales[start // self.block : start // self.block + absmax.size]
            np.divide(absmax, self.levels, out=s)
            inverse = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
            q = np.rint(_scale_blocks(x, inverse, self.block, scaled[: x.size]), out=scaled[: x.size])
            if self.nibbles:
                codes[start // 2 : start // 2 + math.ceil(x.size / 2)] = _pack_nibbles(q.astype(np.int8))
            else:
                codes[start : start + x.size] = q
        return {"codes": codes, "scales": scales}

    def decode_vector(self, payload: Payload, size: int) -> np.ndarray:
        scales = _expect(payload, "scales", np.float32, math.ceil(size / self.block))
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise PayloadError("field 'scales' holds a negative, NaN or infinite scale")
        if self.nibbles:
            codes = _expect(payload, "codes", np.uint8, math.ceil(size / 2))
        else:
            codes = _expect(payload, "codes", np.int8, size)
        out = np.empty(size, np.float32)
        for start in range(0, size, self.step):
            o = out[start : start + self.step]
            if self.nibbles:
                q = _unpack_nibbles(codes[start // 2 : start // 2 + math.ceil(o.size / 2)], o.size)
            else:
                q = codes[start : start + o.size]
            if q.min() < -self.levels or q.max() > self.levels:
                raise PayloadError(f"field 'codes' holds a code outside [-{self.levels}, {self.levels}]")
            np.copyto(o, q)
            first = start // self.block
            _scale_blocks(o, scales[first : first + math.ceil(o.size / self.block)], self.block, o)
        return out


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Codes in [-7, 7] as ``q + 8``, two per byte (low nibble first; an odd tail pads with 8)."""
    nibbles = (codes + 8).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(8))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_nibbles(packed: np.ndarray, size: int) -> np.ndarray:
    codes = np.empty(packed.size * 2, np.int8)
    codes[0::2], codes[1::2] = packed & 0x0F, packed >> 4
    codes -= 8
    return codes[:size]


class TopK(VectorCodec):
    """Top-k sparsification by magnitude: the ``k = ceil(fraction n)`` largest values of the vector and
    their int32 indices, with error feedback (Seide et al. 2014; Karimireddy et al., ICML 2019)."""

    fields = ("indices", "values")
    error_feedback = True

    def __init__(self, name: str, fraction: float) -> None:
        super().__init__(name)
        self.fraction = fraction

    def k(self, size: int) -> int:
        return min(size, max(1, math.ceil(self.fraction * size)))

    def encode_vector(self, flat: np.ndarray) -> Payload:
        k = self.k(flat.size)
        if k == 0:
            return {"indices": np.zeros(0, np.int32), "values": np.zeros(0, np.float32)}
        indices = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :].astype(np.int32)
        indices.sort()
        return {"indices": indices, "values": flat[indices]}

    def decode_vector(self, payload: Payload, size: int) -> np.ndarray:
        k = self.k(size)
        indices = _expect(payload, "indices", np.int32, k)
        values = _expect(payload, "values", np.float32, k)
        if k and (indices.min() < 0 or indices.max() >= size):
            raise PayloadError(f"field 'indices' holds an index outside [0, {size})")
        out = np.zeros(size, np.float32)
        out[indices] = values
        return out


#: Values per rotation chunk: a power of two, so a chunk's Walsh-Hadamard transform needs no padding.
ROTATION_CHUNK = 1 << 16
#: The smallest power-of-two piece a tail is cut into (below it, the rest is padded).
ROTATION_PIECE = 256


#: Butterflies below this span run as one matrix product per block of this many values (BLAS).
_HADAMARD_BLOCK = 256


@functools.cache
def _sylvester(size: int, dtype: type) -> np.ndarray:
    """The ``size`` x ``size`` Sylvester Hadamard matrix (entries +-1; symmetric)."""
    h: np.ndarray = np.ones((1, 1), dtype)
    while len(h) < size:
        h = np.block([[h, h], [h, -h]])
    return h


def _hadamard(x: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform of each row of ``x`` (row length a power of two), in
    float32 (float64 stays float64); it is its own inverse. H_n = H_(n/k) (x) H_k: the low bits by a
    matrix product per block of k values, the high ones by butterflies over contiguous halves."""
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    rows, n = x.shape
    k = min(n, _HADAMARD_BLOCK)
    out = (np.asarray(x, dtype).reshape(-1, k) @ _sylvester(k, dtype)).reshape(rows, n)
    buf = np.empty_like(out)
    h = k
    while h < n:
        src, dst = out.reshape(rows, n // (2 * h), 2, h), buf.reshape(rows, n // (2 * h), 2, h)
        np.add(src[:, :, 0], src[:, :, 1], out=dst[:, :, 0])
        np.subtract(src[:, :, 0], src[:, :, 1], out=dst[:, :, 1])
        out, buf = buf, out
        h *= 2
    return np.multiply(out, 1 / math.sqrt(n), out=out)


class RotatedStochastic(VectorCodec):
    """Random rotation (signs from ``seed``, then Walsh-Hadamard per chunk) and ``bits``-bit unbiased
    stochastic quantisation per chunk (Suresh et al., ICML 2017). Chunks hold ``chunk`` values; the
    tail is cut into power-of-two pieces (see ``_segments``). Codes are uint8 (nibble-packed for
    ``bits <= 4``) or uint16; the range ``m`` per chunk is float32."""

    fields = ("codes", "ranges", "seed")

    def __init__(self, name: str, bits: int, chunk: int = ROTATION_CHUNK) -> None:
        super().__init__(name)
        self.bits, self.chunk = bits, chunk
        self.top = (1 << bits) - 1  # codes 0..top over [-m, m]

    def _segments(self, size: int) -> list[tuple[int, int, int]]:
        """(start, rows, width) of the full chunks, then the tail as power-of-two pieces (its binary
        digits down to ROTATION_PIECE), the last piece zero-padded: under ROTATION_PIECE values of padding."""
        full = size // self.chunk
        segments = [(0, full, self.chunk)] if full else []
        start, width = full * self.chunk, self.chunk // 2
        while size - start >= ROTATION_PIECE:
            if size - start >= width:
                segments.append((start, 1, width))
                start += width
            width //= 2
        if size > start:
            segments.append((start, 1, 1 << (size - start - 1).bit_length()))
        return segments

    def _rotations(self, seed: np.ndarray, segments: list[tuple[int, int, int]]):
        """Per segment: its (start, rows, width) and its random signs, all drawn from ``seed``."""
        rng = np.random.default_rng(int(seed[0]))
        for start, rows, width in segments:
            bits = np.unpackbits(np.frombuffer(rng.bytes(math.ceil(rows * width / 8)), np.uint8))[: rows * width]
            yield start, rows, width, (1 - 2 * bits.astype(np.float32)).reshape(rows, width)

    def encode_vector(self, flat: np.ndarray) -> Payload:
        seed = np.frombuffer(secrets.token_bytes(8), np.uint64).copy()
        rounding = np.random.default_rng(secrets.randbits(64))
        codes, ranges = [], []
        for start, rows, width, signs in self._rotations(seed, self._segments(flat.size)):
            block = np.zeros(rows * width, np.float32)
            part = flat[start : start + rows * width]
            block[: part.size] = part
            y = _hadamard(block.reshape(rows, width) * signs)
            m = np.abs(y).max(axis=1)
            step = np.where(m > 0, 2 * m / self.top, 1.0).astype(np.float32)
            q = np.floor((y + m[:, None]) / step[:, None] + rounding.random(y.shape, dtype=np.float32))
            codes.append(np.clip(q, 0, self.top, out=q).reshape(-1))
            ranges.append(m)
        q = np.concatenate(codes) if codes else np.zeros(0)
        if self.bits <= 4:
            packed = _pack_nibbles((q - 8).astype(np.int8))  # nibble = code (0..15)
        else:
            packed = q.astype(np.uint8 if self.bits <= 8 else np.uint16)
        m_all = np.concatenate(ranges) if ranges else np.zeros(0)
        return {"codes": packed, "ranges": m_all.astype(np.float32), "seed": seed}

    def decode_vector(self, payload: Payload, size: int) -> np.ndarray:
        segments = self._segments(size)
        padded = sum(rows * width for _, rows, width in segments)
        seed = _expect(payload, "seed", np.uint64, 1)
        m_all = _expect(payload, "ranges", np.float32, sum(rows for _, rows, _ in segments))
        if not (np.isfinite(m_all).all() and (m_all >= 0).all()):
            raise PayloadError("field 'ranges' holds a negative, NaN or infinite range")
        wire = np.uint8 if self.bits <= 8 else np.uint16
        raw = _expect(payload, "codes", wire, math.ceil(padded / 2) if self.bits <= 4 else padded)
        codes = _unpack_nibbles(raw, padded) + 8 if self.bits <= 4 else raw
        if codes.size and int(codes.max()) > self.top:
            raise PayloadError(f"field 'codes' holds a code above {self.top} ({self.bits} bits)")
        out, offset, row = np.empty(padded, np.float32), 0, 0
        for start, rows, width, signs in self._rotations(seed, segments):
            m = m_all[row : row + rows]
            step = np.where(m > 0, 2 * m / self.top, 0.0).astype(np.float32)
            y = codes[offset : offset + rows * width].reshape(rows, width) * step[:, None] - m[:, None]
            out[start : start + rows * width] = (_hadamard(y) * signs).reshape(-1)
            offset, row = offset + rows * width, row + rows
        return out[:size]


#: Codec name -> factory from the ``compression.*`` settings; ``none`` is no codec.
CODECS: dict[str, Callable[[CompressionConfig], Codec]] = {
    "fp16": lambda c: CastCodec("fp16", torch.float16, np.float16),
    "bf16": lambda c: CastCodec("bf16", torch.bfloat16, np.uint16),
    "int8": lambda c: BlockwiseAbsmax("int8", 127, c.block_size, nibbles=False),
    "int4": lambda c: BlockwiseAbsmax("int4", 7, c.block_size, nibbles=True),
    "topk": lambda c: TopK("topk", c.top_k_fraction),
    "rotation": lambda c: RotatedStochastic("rotation", c.bits),
}


def make_codec(settings: CompressionConfig) -> Codec | None:
    """The codec ``settings.codec`` names, or None for ``none``."""
    return None if settings.codec == "none" else CODECS[settings.codec](settings)


# ---- wire form ------------------------------------------------------------------------------


def to_records(content: RecordDict, codec: Codec, payload: Payload, arrays_key: str) -> RecordDict:
    """``content`` with its ``arrays_key`` record replaced by the payload."""
    records = {key: record for key, record in content.items() if key != arrays_key}
    records[COMPRESSED] = ArrayRecord({field: Array(np.ascontiguousarray(v)) for field, v in payload.items()})
    records[COMPRESSION] = ConfigRecord({"codec": codec.name})
    return RecordDict(records)


def is_compressed(content: RecordDict) -> bool:
    return COMPRESSION in content.config_records or COMPRESSED in content.array_records


def encoded_bytes(content: RecordDict) -> int:
    """Bytes of the payload in ``content`` (as Flower counts an ArrayRecord)."""
    return content.array_records[COMPRESSED].count_bytes() if COMPRESSED in content.array_records else 0


def from_records(content: RecordDict, codec: Codec) -> tuple[Payload, RecordDict]:
    """The payload in ``content`` and the rest of its records; PayloadError if it names another codec,
    is missing, or a field's bytes do not load as an array."""
    named = content.config_records[COMPRESSION].get("codec") if COMPRESSION in content.config_records else None
    if named != codec.name:
        raise PayloadError(f"encoded with codec {named!r}, this server decodes {codec.name!r}")
    if COMPRESSED not in content.array_records:
        raise PayloadError(f"missing ArrayRecord '{COMPRESSED}'")
    payload: Payload = {}
    for field, array in content.array_records[COMPRESSED].items():
        try:
            payload[field] = array.numpy()
        except Exception as exc:  # noqa: BLE001 - truncated or malformed npy bytes fail in many ways
            raise PayloadError(f"field '{field}' cannot be loaded: {type(exc).__name__}: {exc}") from None
    rest = RecordDict({key: record for key, record in content.items() if key not in (COMPRESSED, COMPRESSION)})
    return payload, rest
