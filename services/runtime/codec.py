"""Tensor <-> protobuf: the one place that knows how tensors travel.

Wire format: `Tensor {dtype, shape, data}` with row-major, little-endian raw bytes; bfloat16
travels as its raw 2-byte words (numpy has no bf16, so bytes go through a uint8 view). Tensors
larger than one message travel as a stream of `TensorChunk`s."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator

import torch

from services.runtime.errors import InvalidRequestError
from services.runtime.proto import common_pb2 as pb

if sys.byteorder != "little":  # raw bytes are sent as laid out in memory
    raise ImportError("ditserve's tensor codec needs a little-endian host")

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "uint8": torch.uint8,
    "int64": torch.int64,
}
_NAMES = {v: k for k, v in DTYPES.items()}

# gRPC's default limit is 4 MiB; every ditserve channel and server raises it to this, and
# anything that could exceed CHUNK_BYTES travels chunked (see TensorChunk).
MAX_MESSAGE_BYTES = 256 * 2**20
CHUNK_BYTES = 32 * 2**20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

# A peer can vanish without closing its TCP connection (a node lost, a network partition, a
# frozen process); without pings a call on that connection waits for its deadline (600 s for a
# denoise). Every ditserve channel and server (stage and public) sets keepalive_options().
KEEPALIVE_S, KEEPALIVE_TIMEOUT_S = 20.0, 10.0


def keepalive_options(every_s: float = KEEPALIVE_S, timeout_s: float = KEEPALIVE_TIMEOUT_S) -> list[tuple]:
    """Ping the peer every `every_s` and drop the connection (its calls fail UNAVAILABLE) when a
    ping goes unanswered for `timeout_s`. Both ends use the same list: a channel reads the
    sending options, a server the receiving ones (and pings its callers too; that side is not
    tested here). Checked with grpcio 1.85 against a SIGSTOPped server
    (tests/cpu/test_grpc_keepalive.py): with the keepalive time and timeout alone the ping went
    out but its wait was c-core's ping timeout (60 s), so the call ran to its deadline; with
    http2.ping_timeout_ms it fails in ~2 s."""
    every, timeout = int(every_s * 1000), int(timeout_s * 1000)
    return [
        ("grpc.keepalive_time_ms", every),
        ("grpc.keepalive_timeout_ms", timeout),
        ("grpc.http2.ping_timeout_ms", timeout),  # what bounds a ping's wait (see above)
        ("grpc.keepalive_permit_without_calls", 1),
        # A silent call (a long unary encode, a first compile) sends no data between pings: no
        # cap on such pings, and no 5-minute spacing of them (both c-core's defaults)...
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_time_between_pings_ms", every),
        # ...and the receiving end accepts them that often: c-core documents a 5-minute minimum
        # between data-less pings, enforced with GOAWAY after two strikes (grpcio 1.85 did not
        # enforce it in a 4 s call pinged every 0.3 s; other versions and peers may).
        ("grpc.http2.min_ping_interval_without_data_ms", every // 2),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    if t.dtype not in _NAMES:
        raise TypeError(f"cannot send dtype {t.dtype}")
    return pb.Tensor(dtype=_NAMES[t.dtype], shape=list(t.shape), data=_raw_bytes(t))


def tensor_from_proto(msg: pb.Tensor, data: bytes | None = None) -> torch.Tensor:
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidRequestError(f"unknown tensor dtype '{msg.dtype}'")
    raw = msg.data if data is None else data
    shape = tuple(msg.shape)
    expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if len(raw) != expected:
        raise InvalidRequestError(f"tensor of shape {list(shape)} {msg.dtype} needs {expected} bytes, got {len(raw)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def tensor_chunks(t: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Header chunk (dtype, shape, total size), then data chunks of at most chunk_bytes."""
    if t.dtype not in _NAMES:
        raise TypeError(f"cannot send dtype {t.dtype}")
    raw = _raw_bytes(t)
    yield pb.TensorChunk(header=pb.Tensor(dtype=_NAMES[t.dtype], shape=list(t.shape)), total_bytes=len(raw))
    view = memoryview(raw)
    for start in range(0, len(raw), chunk_bytes):
        yield pb.TensorChunk(data=bytes(view[start : start + chunk_bytes]))


class TensorAssembler:
    """Collects a chunk stream back into a tensor; `done` once every byte has arrived."""

    def __init__(self) -> None:
        self.header: pb.Tensor | None = None
        self.total = 0
        self.parts: list[bytes] = []
        self.received = 0

    def add(self, chunk: pb.TensorChunk) -> None:
        if chunk.HasField("header"):
            self.header, self.total = chunk.header, chunk.total_bytes
        elif self.header is None:
            raise InvalidRequestError("tensor chunk stream did not start with a header")
        if chunk.data:
            self.parts.append(chunk.data)
            self.received += len(chunk.data)

    @property
    def done(self) -> bool:
        return self.header is not None and self.received >= self.total

    def tensor(self) -> torch.Tensor:
        if not self.done:
            raise InvalidRequestError(f"tensor stream ended after {self.received} of {self.total} bytes")
        return tensor_from_proto(self.header, b"".join(self.parts))


def assemble(chunks: Iterable[pb.TensorChunk]) -> torch.Tensor:
    asm = TensorAssembler()
    for c in chunks:
        asm.add(c)
    return asm.tensor()
