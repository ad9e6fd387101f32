from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("header", "total_bytes", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: Tensor
    total_bytes: int
    data: bytes
    def __init__(self, header: _Optional[_Union[Tensor, _Mapping]] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StageMetrics(_message.Message):
    __slots__ = ("seconds", "peak_memory_bytes", "peak_memory_by_rank", "lora_loads", "lora_hits")
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BY_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_LOADS_FIELD_NUMBER: _ClassVar[int]
    LORA_HITS_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    peak_memory_bytes: int
    peak_memory_by_rank: _containers.RepeatedScalarFieldContainer[int]
    lora_loads: int
    lora_hits: int
    def __init__(self, seconds: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., peak_memory_by_rank: _Optional[_Iterable[int]] = ..., lora_loads: _Optional[int] = ..., lora_hits: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class LoraAdapter(_message.Message):
    __slots__ = ("name", "path", "strength")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    strength: float
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., strength: _Optional[float] = ...) -> None: ...

class SampleLoras(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[LoraAdapter]
    def __init__(self, adapters: _Optional[_Iterable[_Union[LoraAdapter, _Mapping]]] = ...) -> None: ...

class CachePolicy(_message.Message):
    __slots__ = ("enabled", "preset", "Fn_compute_blocks", "Bn_compute_blocks", "residual_diff_threshold", "max_warmup_steps", "max_cached_steps", "max_continuous_cached_steps", "taylorseer_order")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    FN_COMPUTE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BN_COMPUTE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_DIFF_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTINUOUS_CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    TAYLORSEER_ORDER_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    preset: str
    Fn_compute_blocks: int
    Bn_compute_blocks: int
    residual_diff_threshold: float
    max_warmup_steps: int
    max_cached_steps: int
    max_continuous_cached_steps: int
    taylorseer_order: int
    def __init__(self, enabled: _Optional[bool] = ..., preset: _Optional[str] = ..., Fn_compute_blocks: _Optional[int] = ..., Bn_compute_blocks: _Optional[int] = ..., residual_diff_threshold: _Optional[float] = ..., max_warmup_steps: _Optional[int] = ..., max_cached_steps: _Optional[int] = ..., max_continuous_cached_steps: _Optional[int] = ..., taylorseer_order: _Optional[int] = ...) -> None: ...

class CacheStats(_message.Message):
    __slots__ = ("computed_steps", "cached_steps")
    COMPUTED_STEPS_FIELD_NUMBER: _ClassVar[int]
    CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    computed_steps: int
    cached_steps: int
    def __init__(self, computed_steps: _Optional[int] = ..., cached_steps: _Optional[int] = ...) -> None: ...
