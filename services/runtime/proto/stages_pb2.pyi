from services.runtime.proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("prompts", "max_sequence_length", "images")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    max_sequence_length: int
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., max_sequence_length: _Optional[int] = ..., images: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("prompt_embeds", "pooled_prompt_embeds", "metrics", "prompt_lengths", "image_embeds")
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    prompt_embeds: _common_pb2.Tensor
    pooled_prompt_embeds: _common_pb2.Tensor
    metrics: _common_pb2.StageMetrics
    prompt_lengths: _containers.RepeatedScalarFieldContainer[int]
    image_embeds: _common_pb2.Tensor
    def __init__(self, prompt_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., pooled_prompt_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., metrics: _Optional[_Union[_common_pb2.StageMetrics, _Mapping]] = ..., prompt_lengths: _Optional[_Iterable[int]] = ..., image_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class Conditioning(_message.Message):
    __slots__ = ("prompt_embeds", "pooled_prompt_embeds")
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    prompt_embeds: _common_pb2.Tensor
    pooled_prompt_embeds: _common_pb2.Tensor
    def __init__(self, prompt_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., pooled_prompt_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DenoiseRequest(_message.Message):
    __slots__ = ("positive", "negative", "height", "width", "num_inference_steps", "guidance_scale", "true_cfg_scale", "seeds", "sample_loras", "cache", "prompts", "negative_prompts", "max_sequence_length", "num_frames", "input_images", "mask", "fps", "cfg_normalization", "cfg_truncation", "reference_latents", "image_embeds", "guidance_scale_2")
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    TRUE_CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_LORAS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    INPUT_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    CFG_NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    CFG_TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LATENTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_2_FIELD_NUMBER: _ClassVar[int]
    positive: Conditioning
    negative: Conditioning
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    seeds: _containers.RepeatedScalarFieldContainer[int]
    sample_loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.SampleLoras]
    cache: _common_pb2.CachePolicy
    prompts: _containers.RepeatedScalarFieldContainer[str]
    negative_prompts: _containers.RepeatedScalarFieldContainer[str]
    max_sequence_length: int
    num_frames: int
    input_images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    mask: _common_pb2.Tensor
    fps: int
    cfg_normalization: float
    cfg_truncation: float
    reference_latents: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    image_embeds: _common_pb2.Tensor
    guidance_scale_2: float
    def __init__(self, positive: _Optional[_Union[Conditioning, _Mapping]] = ..., negative: _Optional[_Union[Conditioning, _Mapping]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., true_cfg_scale: _Optional[float] = ..., seeds: _Optional[_Iterable[int]] = ..., sample_loras: _Optional[_Iterable[_Union[_common_pb2.SampleLoras, _Mapping]]] = ..., cache: _Optional[_Union[_common_pb2.CachePolicy, _Mapping]] = ..., prompts: _Optional[_Iterable[str]] = ..., negative_prompts: _Optional[_Iterable[str]] = ..., max_sequence_length: _Optional[int] = ..., num_frames: _Optional[int] = ..., input_images: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., mask: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., fps: _Optional[int] = ..., cfg_normalization: _Optional[float] = ..., cfg_truncation: _Optional[float] = ..., reference_latents: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., image_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., guidance_scale_2: _Optional[float] = ...) -> None: ...

class DenoiseEvent(_message.Message):
    __slots__ = ("progress", "latents", "metrics", "cache_stats", "images")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CACHE_STATS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    latents: _common_pb2.TensorChunk
    metrics: _common_pb2.StageMetrics
    cache_stats: _common_pb2.CacheStats
    images: _common_pb2.TensorChunk
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., latents: _Optional[_Union[_common_pb2.TensorChunk, _Mapping]] = ..., metrics: _Optional[_Union[_common_pb2.StageMetrics, _Mapping]] = ..., cache_stats: _Optional[_Union[_common_pb2.CacheStats, _Mapping]] = ..., images: _Optional[_Union[_common_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("latents",)
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    latents: _common_pb2.Tensor
    def __init__(self, latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DecodeEvent(_message.Message):
    __slots__ = ("images", "metrics")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    images: _common_pb2.TensorChunk
    metrics: _common_pb2.StageMetrics
    def __init__(self, images: _Optional[_Union[_common_pb2.TensorChunk, _Mapping]] = ..., metrics: _Optional[_Union[_common_pb2.StageMetrics, _Mapping]] = ...) -> None: ...

class VaeEncodeRequest(_message.Message):
    __slots__ = ("images", "height", "width", "num_frames")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    height: int
    width: int
    num_frames: int
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., num_frames: _Optional[int] = ...) -> None: ...

class VaeEncodeResponse(_message.Message):
    __slots__ = ("latents", "metrics")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    latents: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    metrics: _common_pb2.StageMetrics
    def __init__(self, latents: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., metrics: _Optional[_Union[_common_pb2.StageMetrics, _Mapping]] = ...) -> None: ...
