"""PyTorch Pix2Seq model: a vision encoder and a causal Transformer decoder that writes objects as tokens."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoBackbone
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.generation.utils import GenerateBeamEncoderDecoderOutput, GenerateEncoderDecoderOutput
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
)
from transformers.modeling_utils import (
    ALL_ATTENTION_FUNCTIONS,
    PreTrainedModel,
    get_torch_context_manager_or_global_device,
)
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs
from transformers.utils.deprecation import deprecate_kwarg

from .auxiliary_dense_head import Pix2SeqAuxiliaryDenseHead
from .auxiliary_copy import Pix2SeqAuxiliaryCopy
from .batch_norm_folding import batch_norm_folded
from .box_codec import Pix2SeqBoxCodec
from .configuration_pix2seq import Pix2SeqConfig
from .generation_pix2seq import DECODING_WEIGHTS, Pix2SeqGenerationMixin


logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Pix2SeqObjectDetectionOutput(ModelOutput):
    r"""
    Detections of [`Pix2SeqForObjectDetection`] called without decoder inputs (`model(pixel_values)`), shaped like
    DETR's output so that `post_process_object_detection` and the object-detection pipeline work unchanged.

    Detections are packed at the start of the `N` slots, in the order the model wrote them; `object_mask` marks the
    slots that hold one. `N` is `config.max_objects` (or more, when generation was allowed to write more objects).

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, N, num_classes)`):
            Log-probabilities of the real classes at the class token of each detected object (softmax over the full
            vocabulary, restricted to the class tokens, so a row sums to at most 1 after `exp`). Empty slots hold the
            most negative finite value of the dtype.
        pred_boxes (`torch.FloatTensor` of shape `(batch_size, N, 4)`):
            Boxes `(x_min, y_min, x_max, y_max)` normalised to the padded square canvas. Zeros in empty slots.
        scores (`torch.FloatTensor` of shape `(batch_size, N)`):
            Probability of the predicted class, times the box's coordinate confidence (the geometric mean of its
            four coordinates' probability mass near the written bins; see the `coordinate_window` decoding option).
            Zero in empty slots.
        labels (`torch.LongTensor` of shape `(batch_size, N)`):
            Predicted class (`0..num_classes-1`, the best real class even when the model wrote the noise token). `-1`
            in empty slots.
        object_mask (`torch.BoolTensor` of shape `(batch_size, N)`):
            `True` for slots holding a detection.
        sequences (`torch.LongTensor` of shape `(batch_size, 1 + T)`):
            The generated tokens, detection prompt first.
    """

    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    scores: torch.FloatTensor | None = None
    labels: torch.LongTensor | None = None
    object_mask: torch.BoolTensor | None = None
    sequences: torch.LongTensor | None = None

    @classmethod
    def from_decoded(
        cls, decoded: dict, sequences: torch.LongTensor, min_slots: int | None = None
    ) -> Pix2SeqObjectDetectionOutput:
        """
        Detections from the groups that [`Pix2SeqBoxCodec.decode_groups`] read with `logits`.

        Args:
            decoded (`dict`): the output of `decode_groups` (`boxes`, `labels`, `scores`, `mask`, `class_log_probs`).
            sequences (`torch.LongTensor` of shape `(batch_size, 1 + T)`): the generated tokens, prompt first.
            min_slots (`int`, *optional*): pack the objects of each image at the start, in the order written, into
                `max(min_slots, most objects in an image)` slots. `None`: one slot per group, where it was read.

        Returns:
            `Pix2SeqObjectDetectionOutput`.
        """
        valid = decoded["mask"]
        values = {
            "logits": (decoded["class_log_probs"], torch.finfo(torch.float32).min),
            "pred_boxes": (decoded["boxes"].float(), 0.0),
            "scores": (decoded["scores"].float(), 0.0),
            "labels": (decoded["labels"], -1),
            "object_mask": (valid, False),
        }
        batch_size, num_groups = valid.shape
        if min_slots is None:
            num_slots, order = num_groups, None
        else:
            # Objects first, in the order the model wrote them, then empty slots.
            num_slots = max(min_slots, int(valid.sum(dim=1).max()) if num_groups > 0 else 0)
            order = torch.sort((~valid).int(), dim=1, stable=True).indices
        kept = min(num_slots, num_groups)

        def slots(tensor: torch.Tensor, fill) -> torch.Tensor:
            """`[B, G, ...]` per group -> `[B, num_slots, ...]`, `fill` where there is no object."""
            trailing = [1] * (tensor.ndim - 2)
            fill = torch.as_tensor(fill, dtype=tensor.dtype, device=tensor.device)
            tensor = torch.where(valid.view(batch_size, num_groups, *trailing), tensor, fill)
            if order is not None:
                tensor = tensor.gather(1, order.view(batch_size, num_groups, *trailing).expand_as(tensor))
            packed = tensor.new_full((batch_size, num_slots, *tensor.shape[2:]), fill)
            packed[:, :kept] = tensor[:, :kept]
            return packed

        return cls(**{name: slots(tensor, fill) for name, (tensor, fill) in values.items()}, sequences=sequences)



@dataclass
class Pix2SeqGenerateOutput(GenerateEncoderDecoderOutput):
    r"""
    The dict output of `generate` (greedy decoding, sampling): transformers' [`GenerateEncoderDecoderOutput`] plus the
    detections read out of it, so that the image processor's `post_process_object_detection` takes it as it takes
    the output of `model(pixel_values)`.

    Args:
        detections ([`Pix2SeqObjectDetectionOutput`], *optional*):
            The detections of each sequence ([`~Pix2SeqGenerationMixin.detections_from_generation`]); set when the
            output has the raw `logits` (the default).
    """

    detections: Pix2SeqObjectDetectionOutput | None = None


@dataclass
class Pix2SeqGenerateBeamOutput(GenerateBeamEncoderDecoderOutput):
    r"""
    The dict output of `generate` with beam search: transformers' [`GenerateBeamEncoderDecoderOutput`] plus the
    detections of each returned sequence (scored from the logits of the beams that wrote its tokens).

    Args:
        detections ([`Pix2SeqObjectDetectionOutput`], *optional*):
            One row per returned sequence; set when the output has the raw `logits` (the default).
    """

    detections: Pix2SeqObjectDetectionOutput | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------------


def build_1d_sincos_position_embedding(
    length: int, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """
    Fixed sine-cosine codes of `length` positions along one axis, as the official Pix2Seq code builds them: `[sin,
    cos]` of the position times `1 / 10000 ** (i / (dim // 2))`, positions normalised to `index / (length - 1) * 2 *
    pi` (0 for a single position), so the code is defined for any length.

    Returns:
        `torch.Tensor` of shape `(length, dim)` (`dim` even).
    """
    positions = torch.arange(length, dtype=torch.float32, device=device) / max(length - 1, 1)
    return sincos_code(positions, dim).to(dtype)


def sincos_code(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """
    The sine-cosine code of `build_1d_sincos_position_embedding` at any positions in [0, 1] (0 is the first position
    of an axis, 1 the last): `[sin, cos]` of `position * 2 * pi / 10000 ** (i / (dim // 2))`.

    Returns:
        float32 `torch.Tensor` of shape `(*positions.shape, dim)` (`dim` even).
    """
    if dim % 2 != 0:
        raise ValueError(f"The sine-cosine position code needs an even width, got {dim}.")
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32, device=positions.device) / half))
    angles = (positions.float() * (2 * math.pi))[..., None] * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def build_2d_sincos_position_embedding(
    height: int, width: int, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """
    Fixed 2D sine-cosine position embedding of a `height x width` grid, as the official Pix2Seq code builds it: the
    first half of the channels is the row's `build_1d_sincos_position_embedding`, the second half the column's.

    Returns:
        `torch.Tensor` of shape `(height * width, dim)`, rows in row-major (height, then width) order.
    """
    if dim % 4 != 0:
        raise ValueError(f"The 2D sine-cosine position embedding needs a width divisible by 4, got {dim}.")
    rows = build_1d_sincos_position_embedding(height, dim // 2, device=device)[:, None, :].expand(height, width, -1)
    columns = build_1d_sincos_position_embedding(width, dim // 2, device=device)[None, :, :].expand(height, width, -1)
    return torch.cat([rows, columns], dim=-1).reshape(height * width, dim).to(dtype)


class Pix2SeqDropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability `drop_prob` while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(shape).bernoulli_(keep_prob)
        return hidden_states * mask / keep_prob

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; `query/key/value` are `(batch, heads, length, head_dim)`, the mask is additive."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key.shape[-2]]
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


# The narrowest block of output columns a float32 decoding product is split into on a CPU (`decoding_column_blocks`),
# and the size of a decoder's decoding weights from which they are split (smaller ones stay in the CPU's caches from
# token to token, where whole products are faster).
DECODING_BLOCK_COLUMNS = 16
DECODING_SPLIT_MIN_BYTES = 8 * 2**20

# The most pixels of images the backbone reads at once on a CPU in inference (`Pix2SeqEncoder.backbone_features`): one
# 640 x 640 image. Measured, ms per image for 8 images at once against the best chunk: ResNet-50 at 640 px 536 / 385
# (1 image per chunk), 448 px 259 / 207 (2), 320 px 122 / 110 (2-4); the half-width ResNet-18 at 256 px 12.1 / 9.8 (2),
# at 128 px, 32 images, 2.6 / 2.2 (8; one by one 4.9).
BACKBONE_CHUNK_PIXELS = 640 * 640


def concatenated_parameters(
    owner: nn.Module, name: str, tensors: list[torch.Tensor], transpose: bool = False
) -> torch.Tensor:
    """
    `torch.cat(tensors)` along the first dimension, for one matrix product in place of several: the weights (or
    biases) of several projections stacked, so that they read the same input once. With `transpose`, the (stacked)
    weight transposed and contiguous, `(in_features, out_features)`: the layout in which a CPU multiplies a single row
    by it fastest (a decoding step); when built once per call, split by output columns as [`decoding_column_blocks`]
    says, `(blocks, in_features, out_features / blocks)` (see [`decoding_product`]).

    Inside [`decoding_weights_cache`] (every `generate` call) and without gradients, the result is built once per call
    and per `owner` and `name` (never a parameter or buffer, never in the state dict); elsewhere, with gradients, and
    inside `torch.compile` / `torch.export` (where inductor folds it into a constant when the weights are frozen), it
    is computed where it is used.

    Returns:
        `torch.Tensor`: the concatenation, to be used read-only.
    """
    if len(tensors) == 1 and not transpose:
        return tensors[0]
    cache = DECODING_WEIGHTS.get()
    if (
        cache is None
        or (torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors))
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    ):
        stacked = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        return stacked.t() if transpose else stacked
    # The tensors themselves (not their values, which cannot change within a call): a model moved or cast mid-call,
    # or two models sharing `owner`, build their own.
    key = (id(owner), name, tuple((tensor.data_ptr(), tensor.dtype, tensor.device) for tensor in tensors))
    stacked = cache.get(key)
    if stacked is None:
        with torch.no_grad():
            stacked = torch.cat(tensors)
            if transpose:
                blocks = decoding_column_blocks(stacked, owner.config)
                stacked = stacked.t().reshape(stacked.shape[1], blocks, -1).transpose(0, 1).contiguous()
                stacked = stacked[0] if blocks == 1 else stacked
        cache[key] = stacked
    return stacked


def decoding_weight_bytes(config: Pix2SeqConfig) -> int:
    """The float32 bytes of the weights a decoding step multiplies by: each decoder layer's projections but the
    cross-attention keys/values (computed once per image), and the output projection."""
    hidden, ffn = config.decoder_hidden_size, config.decoder_ffn_dim
    return 4 * (config.decoder_layers * (4 * hidden * hidden + 2 * hidden * ffn) + config.vocab_size * hidden)


def decoding_column_blocks(weight: torch.Tensor, config: Pix2SeqConfig) -> int:
    """
    In how many blocks of output columns a decoding step multiplies by `weight` (`(out_features, in_features)`) of a
    model with `config`: on a CPU in float32, when the decoder's decoding weights ([`decoding_weight_bytes`]) reach
    `DECODING_SPLIT_MIN_BYTES`, the most blocks of at least `DECODING_BLOCK_COLUMNS` columns that divide
    `out_features`; else 1.

    torch multiplies a single row by a whole matrix through a slow matrix-vector path on one thread; as one batched
    product of narrow blocks ([`decoding_product`]) the same numbers come faster, on every thread, when the weights
    come from memory. Measured on a 2-core AVX-512 CPU, decoder alone, ms per token whole -> split: 6 layers of width
    256 (22 MB) 4.0 -> 2.5, 4 layers (16 MB) 2.5 -> 1.7, 2 layers (9 MB) 1.30 -> 1.08; but width 128, 6 layers (6 MB)
    1.68 -> 1.86 and 2 layers (3 MB) 0.92 -> 0.94. Blocks of 8 or 4 columns were slower, and bf16 products slower
    split.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return 1
    if decoding_weight_bytes(config) < DECODING_SPLIT_MIN_BYTES:
        return 1
    return column_blocks(weight.shape[0], DECODING_BLOCK_COLUMNS)


def column_blocks(out_features: int, width: int) -> int:
    """The most blocks of at least `width` columns that divide `out_features` (1 when it has fewer columns)."""
    most = max(1, out_features // width)
    return max(blocks for blocks in range(1, most + 1) if out_features % blocks == 0)


def decoding_product(bias: torch.Tensor, weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """
    `inputs @ weight + bias` for a decoding step's rows `inputs` (`(rows, in_features)`), `weight` as
    [`concatenated_parameters`] keeps it transposed: `(in_features, out_features)`, or split by output columns,
    `(blocks, in_features, out_features / blocks)`, multiplied as one batched product. `bias` is `(out_features,)`,
    or for split weights also `(blocks, 1, out_features / blocks)` ([`decoding_bias`]).

    Returns:
        `torch.Tensor` of shape `(rows, out_features)`.
    """
    if weight.dim() == 2:
        return torch.addmm(bias, inputs, weight)
    blocks, rows = weight.shape[0], inputs.shape[0]
    output = torch.baddbmm(decoding_bias(bias, weight), inputs.expand(blocks, -1, -1), weight)
    # (blocks, rows, columns) -> (rows, out_features): a view for one row.
    return output.view(1, -1) if rows == 1 else output.transpose(0, 1).reshape(rows, -1)


def decoding_bias(bias: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`bias` (`(out_features,)`) in the shape [`decoding_product`] adds it to a product with `weight`: unchanged for
    a 2-D weight, `(blocks, 1, out_features / blocks)` for one split into column blocks (as given if already so)."""
    return bias if weight.dim() == 2 or bias.dim() == 3 else bias.view(weight.shape[0], 1, -1)


def is_plain_linear(module: nn.Module) -> bool:
    """Whether `module` is an `nn.Linear` with a bias and no hooks: its output is `x @ W^T + b` and nothing else (an
    adapter such as a LoRA layer, or a hook, must be called as a module)."""
    return (
        type(module) is nn.Linear
        and module.bias is not None
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


def is_decoding_step(
    module: nn.Module, hidden_states: torch.Tensor, linears: list[nn.Module], key_length: int | None = None
) -> bool:
    """Whether `module` runs a decoding step on `hidden_states`: one token per sequence (or, with `key_length`, the
    few tokens of a speculative verification pass over a static cache), outside training, through plain linear
    `linears` ([`is_plain_linear`]); then they run as [`decoding_linear`]."""
    return (
        (hidden_states.shape[1] == 1 or key_length is not None)
        and not module.training
        and all(is_plain_linear(linear) for linear in linears)
    )


def decoding_linear(owner: nn.Module, name: str, linears: list[nn.Linear], hidden_states: torch.Tensor) -> torch.Tensor:
    """
    The outputs of `linears` (plain `nn.Linear`s of the same input size), concatenated, for the tokens of one
    decoding step `hidden_states` (`(batch, tokens, in_features)`): one product with their weights stacked and kept
    transposed (built once per `generate` call, see [`concatenated_parameters`] and [`decoding_product`]); the same
    result as calling them.

    Returns:
        `torch.Tensor` of shape `(batch, tokens, sum of out_features)`.
    """
    weight = concatenated_parameters(owner, f"{name}_weight", [linear.weight for linear in linears], transpose=True)
    bias = concatenated_parameters(owner, f"{name}_bias", [linear.bias for linear in linears])
    output = decoding_product(bias, weight, hidden_states.reshape(-1, hidden_states.shape[-1]))
    return output.view(*hidden_states.shape[:-1], -1)


class Pix2SeqAttention(nn.Module):
    """
    Multi-head attention: self-attention (optionally causal, with a growing cache) or cross-attention to the encoded
    image, whose keys and values are computed once per image and then read from the cache at every decoding step.

    A decoding step (one token per sequence, outside training) computes the query, key and value in one matrix product
    (the three projections' weights stacked, see [`decoding_linear`]); with a static cache the new keys and values are
    written in place at `cache_position`.
    """

    def __init__(
        self,
        config: Pix2SeqConfig,
        hidden_size: int,
        num_heads: int,
        is_causal: bool = False,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = is_causal
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def is_decoding_step(self, hidden_states: torch.Tensor, key_length: int | None = None) -> bool:
        """Whether `hidden_states` is a decoding step ([`is_decoding_step`]) through plain linear projections: then
        the projections run as [`decoding_linear`] (stacked, transposed weights built once per `generate` call)."""
        return is_decoding_step(
            self, hidden_states, [self.q_proj, self.k_proj, self.v_proj, self.out_proj], key_length=key_length
        )

    def project_query_key_value(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The query, key and value of one decoding step's `hidden_states` (`(batch, tokens, hidden)`) in one matrix
        product.

        Returns:
            Three `torch.Tensor`s of shape `(batch, heads, tokens, head_dim)`.
        """
        qkv = decoding_linear(self, "_qkv", [self.q_proj, self.k_proj, self.v_proj], hidden_states)
        batch_size, length = hidden_states.shape[:2]
        return qkv.view(batch_size, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        cache_position: torch.Tensor | None = None,
        key_length: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, length, hidden)`): the queries' input.
            key_value_states (`torch.Tensor` of shape `(batch / k, memory_length, hidden)`, *optional*):
                The encoded images, for cross-attention; with `k` sequences per image (rows `i * k` to `i * k + k - 1`
                of `hidden_states` for image `i`), their keys and values are computed once and repeated.
            attention_mask (`torch.Tensor`, *optional*): the mask from `create_causal_mask` (or `None`).
            cache (`EncoderDecoderCache`, *optional*): the decoder cache.
            cache_position (`torch.LongTensor` of shape `(length,)`, *optional*): the positions of `hidden_states` in
                the sequence; with a static cache, where its keys and values are written.
            key_length (`int`, *optional*): with a static cache, how many of its positions are filled after this
                step's write; self-attention then reads only those (with `attention_mask` `None` for one token, the
                causal mask over them for several).

        Returns:
            `(attn_output, attn_weights)`; `attn_weights` is `None` unless eager attention is used.
        """
        is_cross_attention = key_value_states is not None
        input_shape = hidden_states.shape[:-1]
        decoding_step = self.is_decoding_step(hidden_states, key_length)

        if is_cross_attention:
            if decoding_step:
                query_states = decoding_linear(self, "_q", [self.q_proj], hidden_states)
                query_states = query_states.view(*input_shape, self.num_heads, self.head_dim).transpose(1, 2)
            else:
                query_states = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
            if cache is not None and cache.is_updated.get(self.layer_idx, False):
                layer = cache.cross_attention_cache.layers[self.layer_idx]
                key_states, value_states = layer.keys, layer.values
            else:
                kv_shape = (*key_value_states.shape[:-1], -1, self.head_dim)
                key_states = self.k_proj(key_value_states).view(kv_shape).transpose(1, 2)
                value_states = self.v_proj(key_value_states).view(kv_shape).transpose(1, 2)
                if cache is not None:
                    key_states, value_states = cache.cross_attention_cache.update(
                        key_states, value_states, self.layer_idx
                    )
                    cache.is_updated[self.layer_idx] = True
            if key_states.shape[0] != input_shape[0]:
                # `k` sequences per image: the image's keys and values, projected once, serve each of them.
                copies = sequences_per_image(key_states.shape[0], input_shape[0])
                key_states = key_states.repeat_interleave(copies, dim=0)
                value_states = value_states.repeat_interleave(copies, dim=0)
        else:
            if decoding_step:
                query_states, key_states, value_states = self.project_query_key_value(hidden_states)
            else:
                query_states, key_states, value_states = (
                    projection(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
                    for projection in (self.q_proj, self.k_proj, self.v_proj)
                )
            if cache is not None:
                key_states, value_states = self._write_cache(
                    cache.self_attention_cache, key_states, value_states, cache_position
                )
                if key_length is not None:
                    key_states, value_states = key_states[:, :, :key_length], value_states[:, :, :key_length]

        implementation = self.config._attn_implementation
        if implementation == "sdpa" and decoding_step:
            # A decoding step: transformers' sdpa wrapper without its per-call checks, which concern longer queries
            # (the queries attend to the keys the mask allows: one query needs no mask, a verification pass has one).
            attn_output = nn.functional.scaled_dot_product_attention(
                query_states, key_states, value_states, attn_mask=attention_mask, scale=self.scaling
            )
            attn_weights = None
            attn_output = attn_output.transpose(1, 2)
        else:
            attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
                implementation, eager_attention_forward
            )
            attn_output, attn_weights = attention_interface(
                self,
                query_states,
                key_states,
                value_states,
                attention_mask,
                dropout=self.dropout if self.training else 0.0,
                scaling=self.scaling,
                is_causal=self.is_causal,
                **kwargs,
            )
        attn_output = attn_output.reshape(*input_shape, -1)
        if decoding_step:
            return decoding_linear(self, "_out", [self.out_proj], attn_output), attn_weights
        return self.out_proj(attn_output), attn_weights

    def _write_cache(
        self, layer_cache, key_states: torch.Tensor, value_states: torch.Tensor, cache_position: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Adds the new keys and values to this layer's self-attention cache and returns all the cached ones. A filled
        static layer is written in place at `cache_position` (the positions the decoder computed once for every
        layer; per sequence when `(batch, length)`); other caches through their own `update`.
        """
        layer = layer_cache.layers[self.layer_idx] if self.layer_idx < len(layer_cache.layers) else None
        if cache_position is not None and cache_position.dim() == 2:
            if type(layer) is not StaticLayer or not layer.is_initialized:
                raise ValueError("Per-sequence cache positions need a static cache that the prompt has filled.")
            rows = torch.arange(key_states.shape[0], device=cache_position.device)[:, None]
            layer.keys[rows, :, cache_position] = key_states.transpose(1, 2)
            layer.values[rows, :, cache_position] = value_states.transpose(1, 2)
            return layer.keys, layer.values
        if cache_position is None or type(layer) is not StaticLayer or not layer.is_initialized:
            return layer_cache.update(key_states, value_states, self.layer_idx)
        layer.keys.index_copy_(2, cache_position, key_states)
        layer.values.index_copy_(2, cache_position, value_states)
        layer.cumulative_length.add_(key_states.shape[2])
        return layer.keys, layer.values


class Pix2SeqMLP(nn.Module):
    """Feed-forward block `fc2(dropout(act(fc1(x))))`; dropout acts on the hidden units (the official `drop_units`)."""

    def __init__(self, config: Pix2SeqConfig, hidden_size: int, ffn_dim: int):
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(hidden_size, ffn_dim)
        self.activation_fn = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(ffn_dim, hidden_size)

    def forward(self, hidden_states: torch.Tensor, key_length: int | None = None) -> torch.Tensor:
        """`key_length`: given for the tokens of a decoding pass over a static cache ([`is_decoding_step`])."""
        if is_decoding_step(self, hidden_states, [self.fc1, self.fc2], key_length=key_length):
            # A decoding step: the products with the transposed weights of the `generate` call (`decoding_linear`).
            hidden_states = self.activation_fn(decoding_linear(self, "_fc1", [self.fc1], hidden_states))
            return decoding_linear(self, "_fc2", [self.fc2], hidden_states)
        return self.fc2(self.dropout(self.activation_fn(self.fc1(hidden_states))))


class Pix2SeqEncoderLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm Transformer encoder layer: `x + drop_path(attn(ln(x)))`, then `x + drop_path(mlp(ln(x)))`."""

    def __init__(self, config: Pix2SeqConfig, layer_idx: int):
        super().__init__()
        hidden_size = config.encoder_hidden_size
        self.self_attn_layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Pix2SeqAttention(config, hidden_size, config.encoder_attention_heads, layer_idx=layer_idx)
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = Pix2SeqMLP(config, hidden_size, config.encoder_ffn_dim)
        self.drop_path = Pix2SeqDropPath(config.drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        attn_output, _ = self.self_attn(self.self_attn_layer_norm(hidden_states), **kwargs)
        hidden_states = hidden_states + self.drop_path(attn_output)
        return hidden_states + self.drop_path(self.mlp(self.final_layer_norm(hidden_states)))


class Pix2SeqBridge(nn.Module):
    """
    Maps the encoded image to the decoder width: linear, LayerNorm, fixed 2D sine-cosine positions, then one pre-LN
    feed-forward block with a residual connection (the official `proj`, `proj_ln`, `proj_mlp`).
    """

    def __init__(self, config: Pix2SeqConfig):
        super().__init__()
        hidden_size = config.decoder_hidden_size
        self.projection = nn.Linear(config.encoder_hidden_size, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp_layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = Pix2SeqMLP(config, hidden_size, config.decoder_ffn_dim)
        self.drop_path = Pix2SeqDropPath(config.drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        hidden_states = self.layer_norm(self.projection(hidden_states))
        hidden_states = hidden_states + build_2d_sincos_position_embedding(
            height, width, hidden_states.shape[-1], dtype=hidden_states.dtype, device=hidden_states.device
        )
        return hidden_states + self.drop_path(self.mlp(self.mlp_layer_norm(hidden_states)))


class Pix2SeqDecoderLayer(GradientCheckpointingLayer):
    """
    Pre-LayerNorm Transformer decoder layer: causal self-attention, cross-attention to the encoded image and a
    feed-forward block, each as `x + drop_path(block(ln(x)))`.
    """

    def __init__(self, config: Pix2SeqConfig, layer_idx: int):
        super().__init__()
        hidden_size, heads = config.decoder_hidden_size, config.decoder_attention_heads
        self.self_attn_layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Pix2SeqAttention(config, hidden_size, heads, is_causal=True, layer_idx=layer_idx)
        self.encoder_attn_layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.encoder_attn = Pix2SeqAttention(config, hidden_size, heads, layer_idx=layer_idx)
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = Pix2SeqMLP(config, hidden_size, config.decoder_ffn_dim)
        self.drop_path = Pix2SeqDropPath(config.drop_path_rate)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        cache: EncoderDecoderCache | None = None,
        cache_position: torch.Tensor | None = None,
        key_length: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(
            self.self_attn_layer_norm(hidden_states),
            attention_mask=attention_mask,
            cache=cache,
            cache_position=cache_position,
            key_length=key_length,
            **kwargs,
        )
        hidden_states = hidden_states + self.drop_path(attn_output)

        attn_output, _ = self.encoder_attn(
            self.encoder_attn_layer_norm(hidden_states),
            key_value_states=encoder_hidden_states,
            cache=cache,
            key_length=key_length,
            **kwargs,
        )
        hidden_states = hidden_states + self.drop_path(attn_output)
        return hidden_states + self.drop_path(self.mlp(self.final_layer_norm(hidden_states), key_length=key_length))


def has_hooks(module: nn.Module) -> bool:
    """Whether `module` or any module inside it has forward hooks or pre-hooks (also registered globally)."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(sub._forward_hooks or sub._forward_pre_hooks for sub in module.modules())


def has_training_modules(module: nn.Module) -> bool:
    """Whether `module` or any module inside it is in training mode (dropout, drop path, BatchNorm's batch statistics
    act)."""
    return any(sub.training for sub in module.modules())


class Pix2SeqDecodingStep:
    """
    The decoder on the new tokens of a decoding step over a filled static cache (one token per sequence, or the
    tokens of a speculative verification pass at per-sequence positions), as one flat sequence of tensor operations:
    the arithmetic of the layers' decoding path ([`Pix2SeqDecoderLayer`] with `key_length`, the same operators on the
    same stacked, transposed weights of [`decoding_linear`] and [`decoding_product`]) without the modules around it.
    At batch 1, ResNet-50 sizes, the per-module work between a token's products (module calls, the checks and weight
    look-ups of each projection, mask and position bookkeeping) took about 2 ms per token on a CPU; here that work is
    done once per `generate` call, when the step is built.

    Built by [`Pix2SeqDecoder.decoding_step`] once per `generate` call ([`decoding_weights_cache`]) and called by
    [`Pix2SeqDecoder.decode`] where it computes exactly what the layers compute: inference, sdpa attention, plain
    `nn.Linear` projections and no hooks.

    Args:
        decoder (`Pix2SeqDecoder`): the decoder whose parameters the step reads (not copied, except the stacked
            transposed projections of [`concatenated_parameters`], shared with the layers' own decoding steps).
    """

    def __init__(self, decoder: Pix2SeqDecoder):
        def projection(owner: nn.Module, name: str, linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
            # The same tensors `decoding_linear(owner, name, linears, ...)` uses: (bias, transposed weight).
            weight = concatenated_parameters(owner, f"{name}_weight", [linear.weight for linear in linears], True)
            bias = concatenated_parameters(owner, f"{name}_bias", [linear.bias for linear in linears])
            return decoding_bias(bias, weight), weight

        def norm(layer_norm: nn.LayerNorm) -> tuple:
            return layer_norm.normalized_shape, layer_norm.weight, layer_norm.bias, layer_norm.eps

        self.token_embeddings = decoder.embed_tokens.weight
        self.position_embeddings = decoder.embed_positions.weight
        # The causal mask of a verification pass, as the layers get it.
        self.positions_mask = decoder._positions_mask
        self.final_norm = norm(decoder.layer_norm)
        attention = decoder.layers[0].self_attn
        self.num_heads, self.head_dim, self.scaling = attention.num_heads, attention.head_dim, attention.scaling
        self.layers = []
        for layer in decoder.layers:
            self_attn, cross_attn, mlp = layer.self_attn, layer.encoder_attn, layer.mlp
            self.layers.append(
                (
                    norm(layer.self_attn_layer_norm),
                    projection(self_attn, "_qkv", [self_attn.q_proj, self_attn.k_proj, self_attn.v_proj]),
                    projection(self_attn, "_out", [self_attn.out_proj]),
                    norm(layer.encoder_attn_layer_norm),
                    projection(cross_attn, "_q", [cross_attn.q_proj]),
                    projection(cross_attn, "_out", [cross_attn.out_proj]),
                    norm(layer.final_layer_norm),
                    projection(mlp, "_fc1", [mlp.fc1]),
                    # Its `forward`: no module call around it (the step runs only without hooks).
                    mlp.activation_fn.forward if isinstance(mlp.activation_fn, nn.Module) else mlp.activation_fn,
                    projection(mlp, "_fc2", [mlp.fc2]),
                )
            )

    @staticmethod
    def applies_to(decoder: Pix2SeqDecoder) -> bool:
        """Whether the step computes what `decoder`'s layers compute: inference, sdpa attention, plain linear
        projections ([`is_plain_linear`]), identity dropout / drop path, no hooks anywhere in the decoder."""
        if decoder.config._attn_implementation != "sdpa" or has_hooks(decoder):
            return False
        if has_training_modules(decoder):
            return False  # dropout and drop path act
        return all(
            is_plain_linear(linear)
            for layer in decoder.layers
            for linear in (
                *(getattr(layer.self_attn, name) for name in ("q_proj", "k_proj", "v_proj", "out_proj")),
                layer.encoder_attn.q_proj,
                layer.encoder_attn.out_proj,
                layer.mlp.fc1,
                layer.mlp.fc2,
            )
        )

    def __call__(
        self,
        input_ids: torch.LongTensor,
        cache: EncoderDecoderCache,
        key_length: int,
        positions: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, length)`): the new tokens of each sequence.
            cache (`EncoderDecoderCache`): static self-attention layers (written in place) and the cross-attention
                keys and values, filled (one image per `k` sequences allowed).
            key_length (`int`): the self-attention positions filled after this step; the tokens attend to those.
            positions (`torch.LongTensor` of shape `(batch_size, length)`, *optional*): each token's position (its
                position embedding, its cache slot and its causal mask, as in [`Pix2SeqDecoder.decode`]). Without
                it: one token per sequence, at position `key_length - 1`, attending to every filled position.

        Returns:
            `torch.Tensor` of shape `(batch_size, length, hidden_size)`: the decoder's output (final LayerNorm
            applied).
        """
        functional, product, layer_norm = nn.functional, decoding_product, torch.layer_norm
        batch_size, length = input_ids.shape
        heads, head_dim = self.num_heads, self.head_dim
        one_token = positions is None
        hidden = functional.embedding(input_ids.reshape(-1), self.token_embeddings)
        if one_token:
            position, mask = key_length - 1, None
            hidden = hidden + self.position_embeddings[position]
        else:
            rows = torch.arange(batch_size, device=input_ids.device)[:, None]
            slots = positions.clamp(max=self.position_embeddings.shape[0] - 1)
            hidden = hidden + functional.embedding(slots.reshape(-1), self.position_embeddings)
            mask = self.positions_mask(key_length, positions, hidden.dtype)
        self_layers = cache.self_attention_cache.layers
        cross_layers = cache.cross_attention_cache.layers
        # With one token per sequence, the heads' layouts need fewer operators (each costs about a microsecond).
        for index, (norm1, qkv, out1, norm2, query, out2, norm3, fc1, activation, fc2) in enumerate(self.layers):
            # Self-attention: the token's query/key/value in one product, its key/value written into the cache.
            states = product(*qkv, layer_norm(hidden, *norm1))
            layer = self_layers[index]
            if one_token:
                query_states, key_states, value_states = states.view(batch_size, 3, heads, 1, head_dim).unbind(1)
                layer.keys.narrow(2, position, 1).copy_(key_states)
                layer.values.narrow(2, position, 1).copy_(value_states)
                layer.cumulative_length.add_(1)
            else:
                query_states, key_states, value_states = states.view(batch_size, length, 3, heads, head_dim).permute(
                    2, 0, 3, 1, 4
                ).unbind(0)
                # As the layers write per-sequence positions: in place, the count left to the loop.
                layer.keys[rows, :, positions] = key_states.transpose(1, 2)
                layer.values[rows, :, positions] = value_states.transpose(1, 2)
            attended = functional.scaled_dot_product_attention(
                query_states,
                layer.keys[:, :, :key_length],
                layer.values[:, :, :key_length],
                attn_mask=mask,
                scale=self.scaling,
            )
            hidden = hidden + product(*out1, self.merge_heads(attended, one_token))
            # Cross-attention to the image's cached keys/values.
            query_states = product(*query, layer_norm(hidden, *norm2))
            if one_token:
                query_states = query_states.view(batch_size, heads, 1, head_dim)
            else:
                query_states = query_states.view(batch_size, length, heads, head_dim).transpose(1, 2)
            keys, values = cross_layers[index].keys, cross_layers[index].values
            if keys.shape[0] != batch_size:
                copies = sequences_per_image(keys.shape[0], batch_size)
                keys, values = keys.repeat_interleave(copies, dim=0), values.repeat_interleave(copies, dim=0)
            attended = functional.scaled_dot_product_attention(query_states, keys, values, scale=self.scaling)
            hidden = hidden + product(*out2, self.merge_heads(attended, one_token))
            # Feed-forward block.
            inner = activation(product(*fc1, layer_norm(hidden, *norm3)))
            hidden = hidden + product(*fc2, inner)
        return layer_norm(hidden, *self.final_norm).view(batch_size, length, -1)

    @staticmethod
    def merge_heads(attended: torch.Tensor, one_token: bool) -> torch.Tensor:
        """Attention outputs `(batch, heads, tokens, head_dim)` as rows `(batch * tokens, heads * head_dim)`."""
        if one_token:
            # (batch, heads, 1, head_dim): the heads of a row are adjacent whichever layout sdpa returns.
            return attended.view(attended.shape[0], -1)
        return attended.transpose(1, 2).reshape(-1, attended.shape[1] * attended.shape[3])


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


class Pix2SeqPreTrainedModel(PreTrainedModel):
    """Base class of the Pix2Seq models: configuration, weight initialisation and loading."""

    # Set explicitly: with postponed annotations, transformers cannot read the class from `config: Pix2SeqConfig`.
    config_class = Pix2SeqConfig
    config: Pix2SeqConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Pix2SeqEncoderLayer", "Pix2SeqDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    # Not declared (untested here): flash attention, which needs CUDA and the `flash-attn` kernels.
    _supports_flash_attn = False
    # The decoder compiles as one graph over a static cache (`generate(cache_implementation="static")`, and the
    # compiled step of `Pix2SeqStaticDecoding`).
    _can_compile_fullgraph = True

    def set_attn_implementation(self, attn_implementation: str | dict, **kwargs):
        """`PreTrainedModel.set_attn_implementation`; the backbone keeps its own implementation where it cannot take
        the requested one (see `Pix2SeqConfig.attn_implementation_request`)."""
        return super().set_attn_implementation(self.config.attn_implementation_request(attn_implementation), **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """
        Truncated normal (`config.init_std`) for linear, embedding and patch-embedding weights (then the coordinate rows
        of the token embedding as `config.coordinate_embedding_init` says), zero biases, LayerNorm to identity.
        The backbone (a `PreTrainedModel` of its own) is initialised by its own `_init_weights` (timm's init for timm
        backbones), never by this one.
        """
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
            if module is getattr(self, "embed_tokens", None) and self.config.coordinate_embedding_init == "sincos":
                self._init_coordinate_embeddings(module.weight)
            if module is getattr(getattr(self, "auxiliary_copy", None), "gate", None):
                # The auxiliary copy starts as an even mixture of the decoder's and the copied distribution.
                init.zeros_(module.weight)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def _init_coordinate_embeddings(self, weight: torch.Tensor) -> None:
        """`coordinate_embedding_init="sincos"`: the row of bin `b` becomes the encoder's position code of pixel
        `(b, b)` (the 1D code of `b` in both halves), at the standard deviation of the other rows' init."""
        config = self.config
        codes = build_1d_sincos_position_embedding(config.num_bins, weight.shape[1] // 2, device=weight.device)
        codes = torch.cat([codes, codes], dim=-1)
        new = weight.detach().clone()
        rows = slice(config.coord_token_offset, config.coord_token_offset + config.num_bins)
        new[rows] = (codes * (config.init_std / codes.std())).to(weight.dtype)
        init.copy_(weight, new)


def _load_pretrained_timm_weights(backbone: nn.Module, backbone_config, model_kwargs: dict) -> None:
    """
    Loads timm's pretrained weights into a `TimmBackbone` built without them.

    `TimmBackbone(pretrained=True)` loads them, but its `_init_weights` (run by `post_init`) then resets every
    BatchNorm's running statistics; so the backbone is built randomly initialised and the pretrained timm model (built
    with the arguments `TimmBackbone` gives `timm.create_model`) is copied into it afterwards.
    """
    import timm

    pretrained = timm.create_model(
        backbone_config.backbone,
        pretrained=True,
        features_only=backbone_config.features_only,
        in_chans=model_kwargs.get("in_chans", backbone_config.num_channels),
        out_indices=backbone_config.out_indices if backbone_config.out_indices is not None else (-1,),
        output_stride=backbone_config.output_stride,
        **{key: value for key, value in model_kwargs.items() if key != "in_chans"},
    )
    missing, unexpected = backbone._backbone.load_state_dict(pretrained.state_dict(), strict=False)
    # Frozen BatchNorm layers (`freeze_batch_norm_2d`) have no `num_batches_tracked`.
    unexpected = [key for key in unexpected if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(
            f"The pretrained timm model `{backbone_config.backbone}` does not match the backbone: missing "
            f"{missing}, unexpected {unexpected}."
        )


def _use_same_padding_stem_pool(backbone: nn.Module) -> None:
    """
    Replaces the stem max-pool of a ResNet backbone (timm's `maxpool` or transformers' `embedder.pooler`) by one with
    TensorFlow's `'SAME'` padding (timm's `MaxPool2dSame`: for even input sizes, one row/column of padding at the
    bottom/right only, where the usual pool pads both sides). The official Pix2Seq ResNets were trained with it; the
    pool has no weights.
    """
    from timm.layers import create_pool2d

    owner, attribute = getattr(backbone, "_backbone", None), "maxpool"  # timm
    if owner is None:
        owner, attribute = getattr(backbone, "embedder", None), "pooler"  # transformers' ResNet
    pool = getattr(owner, attribute, None)
    if not isinstance(pool, nn.MaxPool2d):
        raise ValueError(
            '`stem_pool_padding="same"` needs a ResNet backbone with a max-pool stem (timm `maxpool` or transformers '
            f"`embedder.pooler`); this {type(backbone).__name__} has {type(pool).__name__}."
        )
    same_pool = create_pool2d(
        "max", kernel_size=pool.kernel_size, stride=pool.stride, padding="same", ceil_mode=pool.ceil_mode
    )
    setattr(owner, attribute, same_pool)


def _build_backbone(config: Pix2SeqConfig) -> nn.Module:
    """
    Builds the vision backbone from `config.backbone_config` with `AutoBackbone`.

    timm backbones get `config.backbone_model_kwargs` for `timm.create_model` and, with
    `config.use_pretrained_backbone`, timm's pretrained weights (not while `from_pretrained` builds the model on the
    meta device: the checkpoint provides the weights then). A transformers backbone with `use_pretrained_backbone` is
    loaded from the checkpoint its config came from.
    """
    backbone_config = config.backbone_config
    use_pretrained = bool(config.use_pretrained_backbone)
    if get_torch_context_manager_or_global_device() == torch.device("meta"):
        use_pretrained = False
    if backbone_config.model_type == "timm_backbone":
        model_kwargs = dict(config.backbone_model_kwargs or {})
        backbone = AutoBackbone.from_config(backbone_config, pretrained=False, **model_kwargs)
        if use_pretrained:
            _load_pretrained_timm_weights(backbone, backbone_config, model_kwargs)
        if config.stem_pool_padding == "same":
            _use_same_padding_stem_pool(backbone)
        return backbone
    if config.backbone_model_kwargs:
        raise ValueError(
            "`backbone_model_kwargs` are keyword arguments of `timm.create_model` and only apply to timm backbones; "
            f"the backbone is a `{backbone_config.model_type}` model. Put its options in `backbone_config`."
        )
    if use_pretrained:
        name = getattr(backbone_config, "_name_or_path", "")
        if not name:
            raise ValueError(
                "`use_pretrained_backbone=True` with a transformers backbone needs a `backbone_config` loaded with "
                "`from_pretrained` (its checkpoint name is where the weights come from); got a config without one."
            )
        backbone = AutoBackbone.from_pretrained(name, config=backbone_config)
    else:
        backbone = AutoBackbone.from_config(backbone_config)
    if config.stem_pool_padding == "same":
        _use_same_padding_stem_pool(backbone)
    return backbone


@dataclass
class Pix2SeqEncoderOutput(BaseModelOutput):
    r"""
    Output of [`Pix2SeqEncoder`]: [`BaseModelOutput`] plus, for a model with an auxiliary dense head
    (`config.auxiliary_loss_weight > 0`), what the head predicts at each feature cell (`None` otherwise).

    Args:
        auxiliary_logits (`torch.FloatTensor` of shape `(batch_size, cells, num_classes)`, *optional*):
            Class logits of the auxiliary head.
        auxiliary_distances (`torch.FloatTensor` of shape `(batch_size, cells, 4)`, *optional*):
            Distances from each cell centre to the left, top, right and bottom sides of its predicted box, in units of
            the canvas.
    """

    auxiliary_logits: torch.FloatTensor | None = None
    auxiliary_distances: torch.FloatTensor | None = None


class Pix2SeqEncoder(Pix2SeqPreTrainedModel):
    """
    Vision encoder: backbone (last feature map) -> dropout -> linear -> LayerNorm -> + 2D sine-cosine positions ->
    `config.encoder_layers` pre-LN Transformer layers -> LayerNorm -> bridge to the decoder width. With
    `config.encoder_stem="patch"` (the official Pix2Seq ViT) a patch convolution replaces backbone, dropout and linear.

    Its `last_hidden_state` is what the decoder attends to (after the bridge, `decoder_hidden_size` wide); its
    `hidden_states` are the Transformer encoder's (`encoder_hidden_size` wide): the input of the first layer, then the
    output of every layer (before the final LayerNorm, as in ViT).
    """

    _can_record_outputs = {"hidden_states": Pix2SeqEncoderLayer, "attentions": Pix2SeqAttention}

    def __init__(self, config: Pix2SeqConfig):
        super().__init__(config)
        for name in ("encoder_hidden_size", "decoder_hidden_size"):
            if getattr(config, name) % 4 != 0:
                raise ValueError(
                    f"`{name}={getattr(config, name)}` must be divisible by 4 for the 2D sine-cosine position "
                    "embedding."
                )
        if config.encoder_stem == "patch":
            # The official Pix2Seq ViT: patches embedded straight to the encoder width (no backbone, no projection).
            self.backbone = None
            self.patch_embedding = nn.Conv2d(
                config.num_channels, config.encoder_hidden_size, config.patch_size, stride=config.patch_size
            )
            self.input_dropout = nn.Identity()
            self.input_projection = nn.Identity()
        else:
            self.backbone = _build_backbone(config)
            self.input_dropout = nn.Dropout(config.dropout)
            self.input_projection = nn.Linear(self.backbone.channels[-1], config.encoder_hidden_size)
        self.input_layer_norm = nn.LayerNorm(config.encoder_hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList([Pix2SeqEncoderLayer(config, i) for i in range(config.encoder_layers)])
        self.layer_norm = nn.LayerNorm(config.encoder_hidden_size, eps=config.layer_norm_eps)
        self.bridge = Pix2SeqBridge(config)
        # A training option beyond the paper: dense supervision of the memory (config.auxiliary_loss_weight).
        self.auxiliary_head = Pix2SeqAuxiliaryDenseHead(config) if config.auxiliary_loss_weight > 0 else None
        self.post_init()

    def backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        The backbone's last feature map of `pixel_values` (`(batch_size, num_channels, height, width)`).

        In inference without gradients (no module of the backbone training, no hooks) the backbone runs with the
        BatchNorms after its early convolutions folded into them ([`batch_norm_folded`]; a ResNet-50 at 640 px took
        about 8% less time). On a CPU the backbone reads the images channels-last (oneDNN's convolutions are faster
        over that layout: a ResNet-50 at 640 px took about a quarter less time) and, where no module of it is training
        (BatchNorm uses its running statistics, so an image's features do not depend on the others) and it has no
        hooks, a batch goes through it in chunks of at most `BACKBONE_CHUNK_PIXELS` pixels, whose activations stay
        closer to the CPU's caches (a ResNet-50 at 640 px: 0.54 s per image for 8 images at once, 0.39 one by one).
        Neither inside `torch.compile` or `torch.export` (inductor folds BatchNorms itself; a graph keeps the batch
        size dynamic). The same features up to float rounding.

        Returns:
            `torch.Tensor` of shape `(batch_size, channels, feature_height, feature_width)`.
        """
        hooked, in_training = has_hooks(self.backbone), has_training_modules(self.backbone)
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        if tracing or in_training or hooked or torch.is_grad_enabled():
            return self._backbone_features(self.backbone, pixel_values, chunks=not (tracing or in_training or hooked))
        with batch_norm_folded(self.backbone) as backbone:
            return self._backbone_features(backbone, pixel_values, chunks=True)

    @staticmethod
    def _backbone_features(backbone: nn.Module, pixel_values: torch.Tensor, chunks: bool) -> torch.Tensor:
        """`backbone`'s last feature map of `pixel_values`; on a CPU over channels-last images, with `chunks` in
        chunks of at most `BACKBONE_CHUNK_PIXELS` pixels."""

        def features(images: torch.Tensor) -> torch.Tensor:
            return backbone(images, return_dict=True).feature_maps[-1]

        if pixel_values.device.type != "cpu":
            return features(pixel_values)
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        per_chunk = max(1, BACKBONE_CHUNK_PIXELS // (pixel_values.shape[-2] * pixel_values.shape[-1]))
        if not chunks or per_chunk >= pixel_values.shape[0]:
            return features(pixel_values)
        return torch.cat([features(chunk) for chunk in pixel_values.split(per_chunk)])

    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]) -> Pix2SeqEncoderOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images, as prepared by [`Pix2SeqImageProcessor`], in any memory layout (on a CPU a convolutional
                backbone reads them channels-last).
            output_attentions / output_hidden_states (`bool`, *optional*):
                Return the encoder self-attention weights (eager attention only) / hidden states.
            return_dict (`bool`, *optional*):
                Return a tuple instead of a [`Pix2SeqEncoderOutput`] when `False`.

        Returns:
            [`Pix2SeqEncoderOutput`] with `last_hidden_state` of shape `(batch_size, feature_height * feature_width,
            decoder_hidden_size)` and, with an auxiliary head, its predictions.
        """
        pixel_values = check_pixel_values(pixel_values, self.config.num_channels, self.input_layer_norm.weight.dtype)

        if self.backbone is None:
            feature_map = self.patch_embedding(pixel_values)
        else:
            feature_map = self.backbone_features(pixel_values)
        height, width = feature_map.shape[-2:]
        if self.config.auxiliary_copy and height != width:
            raise ValueError(
                "This model copies boxes from its auxiliary head (`config.auxiliary_copy`), which lays the encoder's "
                f"cells out as a square grid: `pixel_values` of {tuple(pixel_values.shape[-2:])} pixels give "
                f"{height} x {width} cells. Pad the images to a square canvas, as `Pix2SeqImageProcessor` does."
            )
        hidden_states = feature_map.flatten(2).transpose(1, 2)
        hidden_states = self.input_layer_norm(self.input_projection(self.input_dropout(hidden_states)))
        hidden_states = hidden_states + build_2d_sincos_position_embedding(
            height, width, hidden_states.shape[-1], dtype=hidden_states.dtype, device=hidden_states.device
        )

        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        memory = self.bridge(self.layer_norm(hidden_states), height, width)
        auxiliary_logits = auxiliary_distances = None
        if self.auxiliary_head is not None:
            auxiliary_logits, auxiliary_distances = self.auxiliary_head(memory)
        return Pix2SeqEncoderOutput(
            last_hidden_state=memory, auxiliary_logits=auxiliary_logits, auxiliary_distances=auxiliary_distances
        )


class Pix2SeqDecoder(Pix2SeqPreTrainedModel):
    """
    Causal Transformer decoder: token embeddings (shared with the output projection, no `sqrt(d)` scaling) plus
    learned positions -> dropout -> `config.decoder_layers` pre-LN layers -> LayerNorm.
    """

    _can_record_outputs = {
        "hidden_states": Pix2SeqDecoderLayer,
        "attentions": OutputRecorder(Pix2SeqAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(Pix2SeqAttention, index=1, layer_name="encoder_attn"),
    }

    def __init__(self, config: Pix2SeqConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.decoder_hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.decoder_hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([Pix2SeqDecoderLayer(config, i) for i in range(config.decoder_layers)])
        self.layer_norm = nn.LayerNorm(config.decoder_hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor,
        encoder_hidden_states: torch.FloatTensor,
        attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, target_length)`):
                Decoder tokens (only the new ones when `cache` holds the previous ones).
            encoder_hidden_states (`torch.FloatTensor` of shape `(batch_size / k, memory_length, hidden_size)`):
                The encoded images (`Pix2SeqEncoder` output): one per sequence, or one per `k` sequences (image `i`
                for rows `i * k` to `i * k + k - 1`).
            attention_mask (`torch.Tensor` of shape `(batch_size, past_length + target_length)`, *optional*):
                Padding mask of the decoder tokens (1 = attend). Pix2Seq sequences need none: padding is EOS.
            cache (`EncoderDecoderCache`, *optional*):
                Self-attention keys/values of the previous tokens and the cross-attention keys/values of the image.
            use_cache (`bool`, *optional*):
                Create and return a cache when none is given.

        Returns:
            [`BaseModelOutputWithPastAndCrossAttentions`] with `last_hidden_state`, `cache`, `hidden_states`,
            `attentions` (self-attention) and `cross_attentions`.
        """
        if cache is not None and not isinstance(cache, EncoderDecoderCache):
            raise TypeError(
                "Pix2Seq needs an `EncoderDecoderCache` (self- and cross-attention caches), got "
                f"{type(cache).__name__}."
            )
        if cache is None:
            # Whole sequences (training, scoring): checked once. Decoding steps are not (no host synchronisation per
            # token); their tokens come from the model's own vocabulary.
            check_decoder_input_ids(input_ids, self.config.vocab_size)
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))

        target_length = input_ids.shape[1]
        past_length = cache.get_seq_length() if cache is not None else 0
        if isinstance(past_length, torch.Tensor):
            # A static cache counts positions on the device (no host synchronisation); its size bounds them.
            max_length = cache.get_max_length()
        else:
            max_length = past_length + target_length
        if max_length > self.config.max_position_embeddings:
            raise ValueError(
                f"The decoder was asked for positions up to {max_length}, beyond "
                f"`max_position_embeddings={self.config.max_position_embeddings}`: decode at most "
                f"{self.config.max_position_embeddings - 1} new tokens after the prompt (`max_new_tokens`)."
            )
        hidden_states = self.decode(
            input_ids, encoder_hidden_states, attention_mask=attention_mask, cache=cache, **kwargs
        )
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states, cache=cache if use_cache else None
        )

    def decode(
        self,
        input_ids: torch.LongTensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        key_length: int | None = None,
        positions: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """
        The decoder's computation, without `forward`'s checks and output object: what a decoding loop calls at every
        step (`forward` calls it too, so both run the same layers).

        A decoding step (one token over a cache, no padding mask) builds no causal mask: the query attends to the
        whole cache, or with a static cache to its positions up to the token's own (a comparison of the cache
        positions). Several tokens over a static cache with `key_length` (a speculative verification pass) attend to
        the filled positions up to their own. The first call with a cache fills the cross-attention keys and values
        of every layer, in one matrix product over the encoded image. Inside a `generate` call, one token over the
        filled static cache with `key_length` (or the tokens of a verification pass with `positions`) runs as the
        decoder's [`Pix2SeqDecodingStep`] (the same arithmetic without the modules) wherever it applies.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, target_length)`): tokens after those in `cache`.
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, memory_length, decoder_hidden_size)`).
            attention_mask (`torch.Tensor` of shape `(batch_size, past_length + target_length)`, *optional*).
            cache (`EncoderDecoderCache`, *optional*): updated in place.
            key_length (`int`, *optional*): with a static cache, the number of its positions filled after this call
                (known to the loop without reading the device): the tokens attend to those only (one token with no
                mask, several with a causal mask over them). Without it a decoding step attends over the whole static
                cache with a mask of the filled positions (fixed shapes, for compilation and CUDA graphs).
            positions (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*): with a static cache and
                `key_length`, each token's position when the sequences of the batch are at different lengths (a
                batched verification pass): its position embedding, its slot in the cache and its causal mask (a
                padding token goes to a slot at or past `key_length`, which no token attends to). By default the
                tokens follow the cache's filled positions.

        Returns:
            `torch.Tensor` of shape `(batch_size, target_length, decoder_hidden_size)`: the final LayerNorm's output.
        """
        if key_length is not None and attention_mask is None and not kwargs:
            decoding_step = self.decoding_step(input_ids, cache, positions)
            if decoding_step is not None:
                return decoding_step(input_ids, cache, key_length, positions)
        target_length = input_ids.shape[1]
        inputs_embeds = self.embed_tokens(input_ids)
        if positions is None:
            past_length = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(target_length, device=input_ids.device) + past_length
            position_embeddings = self.embed_positions(positions)[None]
        elif cache is None or key_length is None:
            raise ValueError("Per-sequence `positions` need a static `cache` and `key_length`.")
        else:
            position_embeddings = self.embed_positions(positions.clamp(max=self.embed_positions.num_embeddings - 1))
        hidden_states = self.dropout(inputs_embeds + position_embeddings)

        if cache is not None:
            self.fill_cross_attention_cache(cache, encoder_hidden_states)
        implementation = self.config._attn_implementation
        decoding_step = target_length == 1 and cache is not None and attention_mask is None
        # With `key_length`, the layers attend to the filled positions of the static cache only.
        if cache is None or attention_mask is not None or not (decoding_step or implementation in ("sdpa", "eager")):
            key_length = None
        if key_length is None and positions.dim() == 2:
            raise ValueError(
                f"Per-sequence `positions` need sdpa or eager attention and no `attention_mask` (attention "
                f"implementation {implementation!r})."
            )
        if key_length is not None:
            one_position = decoding_step and positions.dim() == 1
            causal_mask = None if one_position else self._positions_mask(key_length, positions, hidden_states.dtype)
        elif decoding_step and implementation in ("sdpa", "eager"):
            causal_mask = self._decoding_step_mask(cache.self_attention_cache, positions, hidden_states.dtype)
        else:
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache.self_attention_cache if cache is not None else None,
            )

        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                causal_mask,
                encoder_hidden_states,  # positional, so that gradient checkpointing passes its gradient through
                cache=cache,
                cache_position=positions,
                key_length=key_length,
                **kwargs,
            )
        return self.layer_norm(hidden_states)

    def decoding_step(
        self, input_ids: torch.LongTensor, cache: EncoderDecoderCache | None, positions: torch.LongTensor | None
    ) -> Pix2SeqDecodingStep | None:
        """
        The [`Pix2SeqDecodingStep`] of this decoder for the current `generate` call (built at its first step and kept
        in [`decoding_weights_cache`]), or `None` where the layers must run themselves: outside such a call, for
        several tokens without per-sequence `positions`, before the prompt filled the static cache, or where the step
        does not apply ([`Pix2SeqDecodingStep.applies_to`]).
        """
        weights = DECODING_WEIGHTS.get()
        if weights is None or cache is None:
            return None
        if (input_ids.shape[1] != 1) if positions is None else (positions.shape != input_ids.shape):
            return None
        layers = cache.self_attention_cache.layers
        if not layers or type(layers[0]) is not StaticLayer or not layers[0].is_initialized:
            return None
        if not all(cache.is_updated.get(index, False) for index in range(len(self.layers))):
            return None
        # Per call, the parameters cannot change; a model moved or cast mid-call has new tensors.
        key = ("decoding_step", id(self), self.embed_tokens.weight.data_ptr(), self.embed_tokens.weight.dtype)
        if key not in weights:
            weights[key] = Pix2SeqDecodingStep(self) if Pix2SeqDecodingStep.applies_to(self) else None
        return weights[key]

    def _decoding_step_mask(self, self_attention_cache, positions: torch.Tensor, dtype: torch.dtype):
        """
        The attention mask of one query over the self-attention cache: `None` for a cache that holds only the
        previous tokens; for a static cache (all its positions, filled or not) the positions up to the query's, as
        booleans for sdpa or additive for eager attention.
        """
        layer = self_attention_cache.layers[0] if self_attention_cache.layers else None
        if type(layer) is not StaticLayer:
            return None
        return self._positions_mask(layer.max_cache_len, positions, dtype)

    def _positions_mask(self, key_length: int, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """
        The causal mask of queries at `positions` (`(queries,)`, or `(batch, queries)`) over the first `key_length`
        cache positions, `(1 or batch, 1, queries, key_length)`: booleans for sdpa, additive for eager attention.
        """
        allowed = torch.arange(key_length, device=positions.device) <= positions[..., None]
        if self.config._attn_implementation == "eager":
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
                ~allowed, torch.finfo(dtype).min
            )
        return allowed[None, None] if positions.dim() == 1 else allowed[:, None]

    def fill_cross_attention_cache(self, cache: EncoderDecoderCache, encoder_hidden_states: torch.Tensor) -> None:
        """
        Computes the cross-attention keys and values of every layer from the encoded image, in one matrix product (the
        layers' key and value projections stacked), and stores them in `cache`; does nothing when they are there (or
        when a projection is not a plain `nn.Linear`: the layers then compute their own).
        """
        if all(cache.is_updated.get(index, False) for index in range(len(self.layers))):
            return
        projections = [
            projection for layer in self.layers for projection in (layer.encoder_attn.k_proj, layer.encoder_attn.v_proj)
        ]
        if not all(is_plain_linear(projection) for projection in projections):
            return  # adapters or hooks: each layer calls its own projections
        weight = concatenated_parameters(self, "_cross_kv_weight", [projection.weight for projection in projections])
        bias = concatenated_parameters(self, "_cross_kv_bias", [projection.bias for projection in projections])
        batch_size, memory_length = encoder_hidden_states.shape[:2]
        attention = self.layers[0].encoder_attn
        states = nn.functional.linear(encoder_hidden_states, weight, bias)
        states = states.view(batch_size, memory_length, len(projections), attention.num_heads, attention.head_dim)
        states = states.permute(2, 0, 3, 1, 4)  # (2 * layers, batch, heads, memory_length, head_dim)
        for index in range(len(self.layers)):
            cache.cross_attention_cache.update(states[2 * index], states[2 * index + 1], index)
            cache.is_updated[index] = True


class Pix2SeqModel(Pix2SeqPreTrainedModel):
    """
    The bare Pix2Seq encoder-decoder, returning the decoder's last hidden states (no output projection).

    Example:

    ```python
    >>> from pix2seq_hf.configuration_pix2seq import Pix2SeqConfig
    >>> from pix2seq_hf.modeling_pix2seq import Pix2SeqModel

    >>> model = Pix2SeqModel(Pix2SeqConfig(backbone="resnet50"))
    >>> outputs = model(pixel_values, decoder_input_ids=decoder_input_ids)
    >>> outputs.last_hidden_state.shape  # (batch_size, target_length, decoder_hidden_size)
    ```
    """

    def __init__(self, config: Pix2SeqConfig):
        super().__init__(config)
        self.encoder = Pix2SeqEncoder(config)
        self.decoder = Pix2SeqDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.decoder.embed_tokens = value

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: EncoderDecoderCache | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`, *optional*):
                Images; not needed when `encoder_outputs` is given.
            decoder_input_ids (`torch.LongTensor` of shape `(batch_size * k, target_length)`):
                Decoder tokens, starting with the detection prompt (`config.bos_token_id`): one sequence per image, or
                `k` per image (image `i`'s at rows `i * k` to `i * k + k - 1`), which then share one encoder pass.
            decoder_attention_mask (`torch.Tensor` of shape `(batch_size, target_length)`, *optional*):
                Padding mask of the decoder tokens; the causal mask is always applied.
            encoder_outputs (`BaseModelOutput` or `tuple`, *optional*):
                Output of `model.get_encoder()(pixel_values)`, to run the encoder once for several decoder calls.
            cache (`EncoderDecoderCache`, *optional*):
                Keys/values of previous decoding steps (also accepted as `past_key_values`).
            use_cache (`bool`, *optional*):
                Return the cache for the next decoding step.
            kwargs (`TransformersKwargs`): `output_attentions` / `output_hidden_states` (attention weights, eager
                attention only / hidden states of the encoder and the decoder), `return_dict` (a tuple when `False`).
        """
        if decoder_input_ids is None:
            raise ValueError("`Pix2SeqModel` needs `decoder_input_ids` (the detection prompt, then the sequence).")
        if encoder_outputs is None:
            if pixel_values is None:
                raise ValueError("Pass `pixel_values` or `encoder_outputs`.")
            encoder_outputs = self.encoder(pixel_values, **{**kwargs, "return_dict": True})
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
            )
        # `k` sequences per image are decoded over the image's memory (the cross-attention repeats its keys/values).
        sequences_per_image(encoder_outputs.last_hidden_state.shape[0], decoder_input_ids.shape[0])

        decoder_outputs = self.decoder(
            decoder_input_ids,
            encoder_outputs.last_hidden_state,
            attention_mask=decoder_attention_mask,
            cache=cache,
            use_cache=use_cache,
            **{**kwargs, "return_dict": True},
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs from targets: the start token, then the targets minus the last one, `-100` replaced by pad."""
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


def check_decoder_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raises `ValueError` naming the first decoder input id outside `[0, vocab_size)`."""
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return  # a data-dependent check: traced graphs have no Python to raise from
    invalid = (input_ids < 0) | (input_ids >= vocab_size)
    if bool(invalid.any()):
        bad = int(input_ids[invalid][0])
        raise ValueError(
            f"`decoder_input_ids` contain token id {bad}, outside the vocabulary [0, {vocab_size}) "
            f"(`vocab_size={vocab_size}`): they were built with another token layout than the model's."
        )


def check_batch_sizes(pixel_values, **sequences: torch.Tensor) -> None:
    """
    Raises `ValueError` when a sequence tensor (`labels`, `decoder_input_ids`) has not one row per image, or the same
    whole number of rows per image (see `sequences_per_image`).
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim == 0:
        return
    for name, tensor in sequences.items():
        if isinstance(tensor, torch.Tensor) and tensor.ndim > 0:
            sequences_per_image(pixel_values.shape[0], tensor.shape[0], name)


def sequences_per_image(num_images: int, num_sequences: int, name: str = "decoder_input_ids") -> int:
    """
    How many training sequences each image has: a batch may hold `k` sequences per image (e.g. `k` object orders or
    noise draws), image `i`'s at rows `i * k` to `i * k + k - 1`, so that one encoder pass serves all of them.

    Returns:
        `int`: `num_sequences // num_images`.

    Raises:
        `ValueError` when `num_sequences` is not a positive whole multiple of `num_images`.
    """
    if num_images <= 0 or num_sequences % num_images or num_sequences == 0:
        raise ValueError(
            f"`{name}` has {num_sequences} rows but `pixel_values` holds {num_images} images: pass one sequence per "
            "image, or the same number k of sequences for every image (image i's at rows i * k to i * k + k - 1)."
        )
    return num_sequences // num_images


def check_pixel_values(pixel_values: torch.Tensor, num_channels: int, dtype: torch.dtype) -> torch.Tensor:
    """
    Checks the images given to the model, once per call at its entry (the encoder), and returns them in `dtype`.

    Args:
        pixel_values (`torch.Tensor`): `(batch_size, num_channels, height, width)` floating-point images.
        num_channels (`int`): the channels the backbone takes.
        dtype (`torch.dtype`): the dtype of the model's weights; floating-point images of another precision (e.g.
            float64 from NumPy) are cast to it.

    Raises:
        `TypeError` for a non-tensor or integer pixels (raw 0-255 values: use the image processor); `ValueError` for a
        wrong shape, no images, or NaN/infinite values (naming the images that hold them).
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"`pixel_values` must have shape (batch_size, {num_channels}, height, width), got "
            f"{tuple(pixel_values.shape)}."
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("`pixel_values` holds no images (batch size 0): pass at least one image.")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"`pixel_values` must be floating point, got {pixel_values.dtype}. Integer pixels are raw image values: "
            "prepare the images with `Pix2SeqImageProcessor` (or the processor), which rescales and pads them."
        )
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return pixel_values.to(dtype)  # the finiteness check below reads values back to the host
    finite = torch.isfinite(pixel_values).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"`pixel_values` contain NaN or infinite values (images {bad[:10]}{' ...' if len(bad) > 10 else ''} of "
            f"the batch of {pixel_values.shape[0]})."
        )
    return pixel_values.to(dtype)


def check_label_ids(labels: torch.Tensor, vocab_size: int) -> None:
    """Raises `ValueError` naming the first target id outside `[0, vocab_size)` that is not `-100` (ignored)."""
    invalid = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
    if bool(invalid.any()):
        value = int(labels[invalid][0])
        raise ValueError(
            f"`labels` contain token id {value}, outside the vocabulary [0, {vocab_size}) (`vocab_size={vocab_size}`) "
            "and not -100 (ignored). The sequences were probably built with another token layout than the model's; "
            "build the processor from this model's config (`Pix2SeqProcessor.from_pretrained` of the same checkpoint)."
        )


def pix2seq_sequence_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    eos_token_id: int,
    eos_token_weight: float,
    coordinate_label_sigma: float = 0.0,
    coord_token_offset: int | None = None,
    num_bins: int | None = None,
) -> torch.Tensor:
    """
    Weighted full-vocabulary cross-entropy of Pix2Seq: every token of the sequence (coordinates, class, noise, EOS) is
    a target over the whole vocabulary, as in the paper; optionally with soft coordinate targets.

    Each target has weight 0 when it is `-100`, `eos_token_weight` when it is the EOS/padding token, 1 otherwise; the
    loss is `sum(w * ce) / sum(w)` (0 when every weight is 0). With `coordinate_label_sigma > 0`, the target of a
    coordinate token (bin `b`) is a Gaussian over the bins, `q(j) ~ exp(-(j - b)^2 / (2 sigma^2))`, and its term is
    `-sum_j q(j) log p(j)` (still over the full-vocabulary softmax) instead of `-log p(b)`.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, length, vocab_size)`)
        labels (`torch.LongTensor` of shape `(batch_size, length)`): ids in `[0, vocab_size)` or `-100` (the model's
            `forward` checks them with [`check_label_ids`] before running; this function does not repeat it).
        eos_token_id (`int`), eos_token_weight (`float`): the EOS/padding token and its weight.
        coordinate_label_sigma (`float`, *optional*, defaults to 0): standard deviation of the soft targets, in bins.
        coord_token_offset (`int`), num_bins (`int`): where the coordinate tokens are (needed when the sigma is > 0).

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    vocab_size = logits.shape[-1]
    ce = nn.functional.cross_entropy(
        logits.reshape(-1, vocab_size).float(), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    if coordinate_label_sigma > 0:
        if coord_token_offset is None or num_bins is None:
            raise ValueError("Soft coordinate targets need `coord_token_offset` and `num_bins`.")
        is_coordinate = (labels >= coord_token_offset) & (labels < coord_token_offset + num_bins)
        if bool(is_coordinate.any()):
            log_probs = logits[is_coordinate].float().log_softmax(-1)[:, coord_token_offset : coord_token_offset + num_bins]
            bins = torch.arange(num_bins, device=logits.device, dtype=torch.float32)
            target_bins = (labels[is_coordinate] - coord_token_offset).float()
            soft = torch.exp(-0.5 * ((bins[None, :] - target_bins[:, None]) / coordinate_label_sigma) ** 2)
            soft = soft / soft.sum(-1, keepdim=True)
            ce = ce.masked_scatter(is_coordinate, -(soft * log_probs).sum(-1))
    weights = torch.ones_like(ce)
    weights = weights.masked_fill(labels == eos_token_id, float(eos_token_weight))
    weights = weights.masked_fill(labels == -100, 0.0)
    total = weights.sum()
    return (weights * ce).sum() / torch.where(total > 0, total, torch.ones_like(total))


class Pix2SeqForObjectDetection(Pix2SeqPreTrainedModel, Pix2SeqGenerationMixin):
    """
    Pix2Seq object detector: [`Pix2SeqModel`] with an output projection tied to the token embeddings (plus a bias).

    - `model(pixel_values, decoder_input_ids=..., labels=...)` returns the weighted sequence loss and the logits
      (training).
    - `model.generate(pixel_values)` decodes object sequences with the model's generation config (nucleus sampling,
      top-p 0.4, up to `5 * max_objects` tokens) and returns `sequences` plus the raw per-step `logits` the processor
      needs for scores (`return_dict_in_generate=True, output_logits=True` are the defaults; with
      `return_dict_in_generate=False` you get a plain tensor of tokens and no scores). It decodes in the static-cache
      loop of [`Pix2SeqGenerationMixin`] unless asked for what only transformers' loop does.
    - `model(pixel_values)` runs that generation and returns a DETR-shaped [`Pix2SeqObjectDetectionOutput`], so that
      `processor.post_process_object_detection(outputs, threshold, target_sizes)` and
      `pipeline("object-detection")` work as for DETR.

    Decoding options, as generation-config attributes or `generate` keyword arguments: see
    `PIX2SEQ_GENERATION_DEFAULTS` and [`Pix2SeqLogitsProcessor`].
    """

    _tied_weights_keys = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, config: Pix2SeqConfig):
        super().__init__(config)
        self.model = Pix2SeqModel(config)
        # The output projection: its weight is the token embedding (tied), its bias the official output bias.
        self.lm_head = nn.Linear(config.decoder_hidden_size, config.vocab_size, bias=True)
        # A training option beyond the paper: tokens partly copied from the auxiliary head's predictions.
        self.auxiliary_copy = Pix2SeqAuxiliaryCopy(config) if config.auxiliary_copy else None
        self._box_codec = None
        self.post_init()
        if self.generation_config is not None:
            self.generation_config = self.default_generation_config(config, self.generation_config)

    # ----- modules ---------------------------------------------------------------------------------------------------

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.lm_head = new_embeddings

    @property
    def box_codec(self) -> Pix2SeqBoxCodec:
        """The box codec of this model's token layout (reads detections out of generated tokens)."""
        layout = self.config.token_layout
        if self._box_codec is None or self._box_codec.layout != layout:
            self._box_codec = Pix2SeqBoxCodec(layout)
        return self._box_codec

    def output_logits(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        positions: torch.LongTensor | int,
        key_length: int | None = None,
    ) -> torch.Tensor:
        """
        The next-token logits of decoder outputs: the output projection, and for a model with `config.auxiliary_copy`
        the mixture with the auxiliary head's boxes and classes ([`Pix2SeqAuxiliaryCopy`]). Every path that turns
        decoder outputs into logits (`forward`, the decoding loops, speculative verification, export) calls this.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, length, decoder_hidden_size)`): the decoder output.
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size / k, memory_length, decoder_hidden_size)`):
                the encoded images (one per `k` sequences, as the decoder takes them); read only with the copy.
            positions (`torch.LongTensor` of shape `(length,)` or `(batch_size, length)`, or `int`): the outputs'
                positions in the sequence (0: the prompt; an `int`: one position shared by every row, as in a decoding
                step); read only with the copy.
            key_length (`int`, *optional*): given for the outputs of a speculative verification pass (as to
                [`Pix2SeqDecoder.decode`]), whose few positions are then projected as a decoding step's are
                ([`decoding_linear`]).

        Returns:
            `torch.Tensor` of shape `(batch_size, length, vocab_size)`: logits (with the copy, float32
            log-probabilities).
        """
        if is_decoding_step(self, hidden_states, [self.lm_head], key_length):
            logits = decoding_linear(self, "_lm_head", [self.lm_head], hidden_states)
        else:
            logits = self.lm_head(hidden_states)
        if self.auxiliary_copy is None:
            return logits
        cells = self.auxiliary_copy_cells(encoder_hidden_states, hidden_states.shape[0])
        return self.auxiliary_copy(logits, hidden_states, cells, positions)

    def auxiliary_copy_cells(self, encoder_hidden_states: torch.Tensor, batch_size: int) -> tuple:
        """
        The auxiliary copy's [`Pix2SeqAuxiliaryCopy.cell_inputs`] for `batch_size` sequences over the encoded images
        `encoder_hidden_states` (one per `k` sequences): the auxiliary head on the memory cells, the pointer keys and
        the kernels of the cells' coordinates.
        Within a `generate` call ([`decoding_weights_cache`], no gradients, not compiling) they are computed once per
        tensor of encoded images and reused by every decoding step; elsewhere at every call.
        """
        cache = DECODING_WEIGHTS.get()
        if cache is not None and (
            torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
        ):
            cache = None
        key = ("auxiliary_copy_cells", id(self))
        if cache is not None:
            # The entry keeps the encoded images it was computed from, so their identity cannot be reused.
            images, rows, cells = cache.get(key, (None, None, None))
            if images is encoder_hidden_states and rows == batch_size:
                return cells
        memory = encoder_hidden_states
        if memory.shape[0] != batch_size:
            memory = memory.repeat_interleave(sequences_per_image(memory.shape[0], batch_size), dim=0)
        class_logits, distances = self.model.encoder.auxiliary_head(memory)
        cells = self.auxiliary_copy.cell_inputs(memory, class_logits, distances)
        if cache is not None:
            cache[key] = (encoder_hidden_states, batch_size, cells)
        return cells

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """
        `PreTrainedModel.save_pretrained`, writing the generation config as
        [`~Pix2SeqGenerationMixin.without_idle_sampling_defaults`] gives it (a model switched to greedy decoding
        saves).
        """
        generation_config = self.generation_config
        self.generation_config = self.without_idle_sampling_defaults(generation_config)
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.generation_config = generation_config

    # ----- forward ---------------------------------------------------------------------------------------------------

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: EncoderDecoderCache | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqLMOutput | Pix2SeqObjectDetectionOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images, as prepared by [`Pix2SeqImageProcessor`] (not needed with `encoder_outputs`).
            decoder_input_ids (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
                Decoder inputs, detection prompt first (from [`Pix2SeqProcessor`] for training). Built from `labels`
                (shifted right after the prompt, `-100` as padding) when only `labels` are given.
            labels (`torch.LongTensor` of shape `(batch_size * k, target_length)`, *optional*):
                Target tokens; `-100` is ignored, EOS/padding weighs `config.eos_token_weight`. One sequence per image,
                or `k` per image as [`Pix2SeqProcessor`] writes them with `sequences_per_image=k` (image `i`'s at rows
                `i * k` to `i * k + k - 1`; one encoder pass serves them all).
            decoder_attention_mask, encoder_outputs, cache (or `past_key_values`), use_cache, kwargs
            (`output_attentions`, `output_hidden_states`, `return_dict`):
                As in [`Pix2SeqModel`].

        Returns:
            With `decoder_input_ids` and/or `labels`: [`Seq2SeqLMOutput`] with `loss` (when `labels` are given),
            `logits` of shape `(batch_size, target_length, vocab_size)`, `cache` and the optional attentions and hidden
            states. With neither: the detections, [`Pix2SeqObjectDetectionOutput`] of `self.detect(pixel_values,
            **kwargs)`: `kwargs` are then `generate`'s options (e.g. `do_sample=False`, `min_objects=1`), and
            sampling is seeded with `generation_config.detect_seed` (see [`~detect`]).

        Raises:
            `ValueError` when `labels` hold ids outside `[0, vocab_size)` other than `-100`; without decoder inputs,
            for a `generate` option whose result the detection output cannot hold (e.g. `num_beams=2`).
        """
        if decoder_input_ids is None and labels is None:
            if pixel_values is None:
                raise ValueError("Pass `pixel_values` (to detect objects) or `decoder_input_ids`/`labels`.")
            given = {"decoder_attention_mask": decoder_attention_mask, "encoder_outputs": encoder_outputs}
            given = [name for name, value in {**given, "cache": cache}.items() if value is not None]
            if given:
                raise ValueError(
                    f"`model(pixel_values)` detects objects and takes `generate`'s options; {', '.join(given)} only "
                    "apply with `decoder_input_ids` or `labels`."
                )
            if use_cache is not None:
                kwargs["use_cache"] = use_cache
            return self.detect(pixel_values, **kwargs)

        if labels is not None:
            if encoder_outputs is None:
                check_batch_sizes(pixel_values, labels=labels)
            if decoder_input_ids is not None and labels.shape[:2] != decoder_input_ids.shape[:2]:
                raise ValueError(
                    f"`labels` {tuple(labels.shape)} and `decoder_input_ids` {tuple(decoder_input_ids.shape)} must "
                    "have the same (batch_size, length): one target per decoder input."
                )
            check_label_ids(labels, self.config.vocab_size)
            use_cache = False
            if decoder_input_ids is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
            if self.model.encoder.auxiliary_head is not None and encoder_outputs is None:
                # The auxiliary loss reads the encoder's dense predictions, which the sequence output does not carry.
                encoder_outputs = self.model.encoder(pixel_values, **{**kwargs, "return_dict": True})

        past_length = cache.get_seq_length() if cache is not None else 0
        outputs = self.model(
            pixel_values,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            use_cache=use_cache,
            **{**kwargs, "return_dict": True},
        )
        positions = torch.arange(decoder_input_ids.shape[1], device=decoder_input_ids.device) + past_length
        logits = self.output_logits(outputs.last_hidden_state, outputs.encoder_last_hidden_state, positions)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = pix2seq_sequence_loss(
                logits,
                labels,
                self.config.eos_token_id,
                self.config.eos_token_weight,
                coordinate_label_sigma=self.config.coordinate_label_sigma,
                coord_token_offset=self.config.coord_token_offset,
                num_bins=self.config.num_bins,
            )
            auxiliary_head = self.model.encoder.auxiliary_head
            if auxiliary_head is not None:
                if getattr(encoder_outputs, "auxiliary_logits", None) is None:
                    raise ValueError(
                        "This model trains an auxiliary dense head (`auxiliary_loss_weight` > 0), whose loss needs the "
                        "encoder's `auxiliary_logits` and `auxiliary_distances`: pass `pixel_values`, or the "
                        "`Pix2SeqEncoderOutput` of `model.get_encoder()`, not a tuple."
                    )
                # Every sequence of an image holds the same real objects: the dense head reads the first.
                copies = sequences_per_image(encoder_outputs.auxiliary_logits.shape[0], labels.shape[0], "labels")
                loss = loss + self.config.auxiliary_loss_weight * auxiliary_head.loss(
                    encoder_outputs.auxiliary_logits,
                    encoder_outputs.auxiliary_distances,
                    labels[::copies],
                    image_size=None if pixel_values is None else tuple(pixel_values.shape[-2:]),
                )

        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
        )


__all__ = [
    "Pix2SeqDecoder",
    "Pix2SeqEncoder",
    "Pix2SeqForObjectDetection",
    "Pix2SeqGenerateBeamOutput",
    "Pix2SeqGenerateOutput",
    "Pix2SeqModel",
    "Pix2SeqObjectDetectionOutput",
    "Pix2SeqPreTrainedModel",
    "build_2d_sincos_position_embedding",
    "check_batch_sizes",
    "check_label_ids",
    "check_pixel_values",
    "pix2seq_sequence_loss",
    "sequences_per_image",
    "shift_tokens_right",
]
