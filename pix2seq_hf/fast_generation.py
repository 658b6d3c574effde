"""Fast Pix2Seq decoding: a static-cache decoding loop for `generate(custom_generate=...)`, optionally compiled.

[`Pix2SeqStaticDecoding`] replaces transformers' sampling/greedy loop and nothing else: `generate` still prepares the
generation config, runs the encoder once, builds the logits processors (the Pix2Seq grammar first) and the stopping
criteria, so the options, outputs and post-processing are the same as with the stock loop. What changes:

- the decoder step is a single function over preallocated tensors: the self-attention keys/values go into a static
  cache of `max_length` positions, the cross-attention keys/values of every layer are computed once per image (one
  fused projection per layer) before the first step, the self-attention query/key/value projections are one fused
  matrix with the attention scale folded into the query rows, and no `Cache` objects, masks or model outputs are
  built per step;
- images whose sequence has finished are dropped from the decoder batch (their caches are compacted), so a batch
  costs what its unfinished images cost;
- with `compile=True` the step is compiled with `torch.compile` over fixed shapes (the whole static cache is read,
  positions after the current one are masked), with the weights frozen into it as constants and `max_autotune`: the
  small operators are fused and, on CPU, the projections run through inductor's own GEMM kernels on packed weights,
  about twice as fast as the BLAS calls for one or a few rows (see `docs/performance.md`);
- with `dtype=torch.bfloat16` (or `float16`) the decoder weights and caches are kept in that dtype, halving the memory
  read per step (on CPU this pays with `compile=True`, whose kernels handle it well); logits are returned in float32
  as usual.

Example:

```python
>>> from pix2seq_hf.fast_generation import Pix2SeqStaticDecoding

>>> decoding = Pix2SeqStaticDecoding()  # keep it: it caches the prepared step (and the compiled one)
>>> outputs = model.generate(pixel_values, custom_generate=decoding, max_new_tokens=500)
>>> detections = model.detections_from_generation(outputs)  # or: model.detect(pixel_values, custom_generate=decoding)
```

Dropout and drop path are not applied (inference). Attentions and hidden states cannot be returned.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers.generation.utils import GenerateEncoderDecoderOutput


class _PreparedLayer(nn.Module):
    """
    One decoder layer's weights laid out for single-token steps, as frozen parameters (copies, `requires_grad=False`,
    which inductor's `freezing` turns into constants; buffers would stay inputs of the compiled step): LayerNorm
    weights and biases (`ln1_*`, `ln2_*`, `ln3_*`), the fused self-attention projection `qkv_*` (query rows scaled by
    `head_dim ** -0.5`), `self_out_*`, the scaled cross-attention query `cross_q_*`, the fused cross-attention
    key/value projection `cross_kv_*`, `cross_out_*`, `fc1_*` and `fc2_*`. Weights (`*_w`) are stored `(in, out)`.
    """

    def __init__(self, layer: nn.Module, cast: Callable, cast_t: Callable):
        super().__init__()
        self_attn, cross_attn = layer.self_attn, layer.encoder_attn
        self_scale, cross_scale = self_attn.scaling, cross_attn.scaling
        q, k, v = self_attn.q_proj, self_attn.k_proj, self_attn.v_proj
        tensors = {
            "ln1_w": cast(layer.self_attn_layer_norm.weight),
            "ln1_b": cast(layer.self_attn_layer_norm.bias),
            "qkv_w": cast_t(torch.cat([q.weight * self_scale, k.weight, v.weight])),
            "qkv_b": cast(torch.cat([q.bias * self_scale, k.bias, v.bias])),
            "self_out_w": cast_t(self_attn.out_proj.weight),
            "self_out_b": cast(self_attn.out_proj.bias),
            "ln2_w": cast(layer.encoder_attn_layer_norm.weight),
            "ln2_b": cast(layer.encoder_attn_layer_norm.bias),
            "cross_q_w": cast_t(cross_attn.q_proj.weight * cross_scale),
            "cross_q_b": cast(cross_attn.q_proj.bias * cross_scale),
            "cross_kv_w": cast_t(torch.cat([cross_attn.k_proj.weight, cross_attn.v_proj.weight])),
            "cross_kv_b": cast(torch.cat([cross_attn.k_proj.bias, cross_attn.v_proj.bias])),
            "cross_out_w": cast_t(cross_attn.out_proj.weight),
            "cross_out_b": cast(cross_attn.out_proj.bias),
            "ln3_w": cast(layer.final_layer_norm.weight),
            "ln3_b": cast(layer.final_layer_norm.bias),
            "fc1_w": cast_t(layer.mlp.fc1.weight),
            "fc1_b": cast(layer.mlp.fc1.bias),
            "fc2_w": cast_t(layer.mlp.fc2.weight),
            "fc2_b": cast(layer.mlp.fc2.bias),
        }
        for name, tensor in tensors.items():
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


class _PreparedDecoder(nn.Module):
    """
    The decoder weights of a model, laid out for single-token steps (fused, transposed to `(in, out)`, cast to the
    compute dtype), as frozen parameters of a module whose `forward` is [`decoder_step`]: compiled with inductor's
    `freezing`, the weights become constants of the compiled step.
    """

    def __init__(self, model, dtype: torch.dtype | None):
        super().__init__()
        decoder = model.model.decoder
        config = model.config
        self.num_heads = config.decoder_attention_heads
        self.hidden_size = config.decoder_hidden_size
        self.head_dim = self.hidden_size // self.num_heads
        self.eps = config.layer_norm_eps
        self.max_positions = config.max_position_embeddings
        reference = decoder.embed_tokens.weight
        self.dtype = dtype or reference.dtype
        self.device = reference.device

        def cast(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.detach().to(self.dtype).clone()

        def cast_t(weight: torch.Tensor) -> torch.Tensor:
            # `(in, out)` layout: `addmm(bias, x, weight_t)` reads the weight row by row, which for one or a few rows
            # of `x` runs about twice as fast on CPU as `linear` with the `(out, in)` parameter.
            return weight.detach().t().to(self.dtype).contiguous()

        self.activation: Callable = decoder.layers[0].mlp.activation_fn if len(decoder.layers) else F.gelu
        self.layers = nn.ModuleList([_PreparedLayer(layer, cast, cast_t) for layer in decoder.layers])
        self.embed_tokens = nn.Parameter(cast(decoder.embed_tokens.weight), requires_grad=False)
        self.embed_positions = nn.Parameter(cast(decoder.embed_positions.weight), requires_grad=False)
        self.final_ln_w = nn.Parameter(cast(decoder.layer_norm.weight), requires_grad=False)
        self.final_ln_b = nn.Parameter(cast(decoder.layer_norm.bias), requires_grad=False)
        self.lm_head_w = nn.Parameter(cast_t(model.lm_head.weight), requires_grad=False)
        lm_head_b = model.lm_head.bias
        self.lm_head_b = nn.Parameter(cast(lm_head_b), requires_grad=False) if lm_head_b is not None else None
        self.eval()

    def forward(self, token_ids, position, self_keys, self_values, cross_keys, cross_values) -> torch.Tensor:
        """[`decoder_step`] with these weights."""
        return decoder_step(self, token_ids, position, self_keys, self_values, cross_keys, cross_values)

    def cross_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Cross-attention keys and values of every layer, computed once per image.

        Args:
            memory (`torch.Tensor` of shape `(batch, memory_length, hidden)`): the encoded images.

        Returns:
            `(keys, values)`, each of shape `(num_layers, batch, heads, memory_length, head_dim)`.
        """
        memory = memory.to(self.dtype)
        batch, length = memory.shape[:2]
        keys, values = [], []
        for layer in self.layers:
            kv = torch.matmul(memory, layer.cross_kv_w) + layer.cross_kv_b
            kv = kv.view(batch, length, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            keys.append(kv[0])
            values.append(kv[1])
        return torch.stack(keys), torch.stack(values)


def _linear(inputs: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`inputs (B, in) @ weight_t (in, out) + bias`."""
    return torch.addmm(bias, inputs, weight_t)


def _attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, fused: bool
) -> torch.Tensor:
    """
    One query per row: `query (B, H, D)` (already scaled) over `keys/values (B, H, L, D)`; `mask (1, 1, 1, L)` is
    `True` where attending is allowed. Returns `(B, H * D)`.

    Eagerly, `scaled_dot_product_attention` is the fastest (one kernel). For `torch.compile` (`fused=True`) the
    attention is written out (scores, softmax, weighted sum) so that inductor fuses it with its neighbours; as an
    external kernel in the compiled step, `scaled_dot_product_attention` took a third of the step's time on CPU.
    """
    if fused:
        scores = torch.matmul(query.unsqueeze(2), keys.transpose(-1, -2))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        return torch.matmul(weights, values).flatten(1)
    attended = F.scaled_dot_product_attention(query.unsqueeze(2), keys, values, attn_mask=mask, scale=1.0)
    return attended.flatten(1)


def decoder_step(
    prepared: _PreparedDecoder,
    token_ids: torch.Tensor,
    position: int | torch.Tensor,
    self_keys: list[torch.Tensor],
    self_values: list[torch.Tensor],
    cross_keys: torch.Tensor,
    cross_values: torch.Tensor,
) -> torch.Tensor:
    """
    One decoding step of the Pix2Seq decoder over a static cache.

    Args:
        prepared (`_PreparedDecoder`): the decoder weights.
        token_ids (`torch.LongTensor` of shape `(batch,)`): the tokens at `position`.
        position (`int` or 0-d `torch.LongTensor`): their position. With an `int` the cache is read up to `position`
            (eager); with a tensor the whole cache is read and later positions are masked (fixed shapes, for
            `torch.compile`).
        self_keys, self_values (lists of `torch.Tensor` of shape `(batch, heads, max_length, head_dim)`): the
            self-attention cache of each layer; this step's keys/values are written at `position`. (Separate tensors:
            a compiled step that writes into a slice of one stacked tensor copies the whole tensor back every step.)
        cross_keys, cross_values (`torch.Tensor` of shape `(num_layers, batch, heads, memory_length, head_dim)`): from
            [`_PreparedDecoder.cross_keys_values`] (read only, so stacked: fewer inputs for a compiled step to check).

    Returns:
        `torch.FloatTensor` of shape `(batch, vocab_size)`: the next-token logits (float32).
    """
    batch = token_ids.shape[0]
    heads, head_dim, hidden_size = prepared.num_heads, prepared.head_dim, prepared.hidden_size
    static = isinstance(position, torch.Tensor)
    if static:
        max_length = self_keys[0].shape[2]
        mask = (torch.arange(max_length, device=token_ids.device) <= position).view(1, 1, 1, max_length)
        position_index = position.view(1)
        position_embedding = prepared.embed_positions.index_select(0, position_index)
    else:
        mask = None
        position_embedding = prepared.embed_positions[position]

    hidden = F.embedding(token_ids, prepared.embed_tokens) + position_embedding
    for index, weights in enumerate(prepared.layers):
        normed = F.layer_norm(hidden, (hidden_size,), weights.ln1_w, weights.ln1_b, prepared.eps)
        query, key, value = _linear(normed, weights.qkv_w, weights.qkv_b).view(batch, 3, heads, head_dim).unbind(1)
        if static:
            self_keys[index].index_copy_(2, position_index, key.unsqueeze(2))
            self_values[index].index_copy_(2, position_index, value.unsqueeze(2))
            keys, values = self_keys[index], self_values[index]
        else:
            self_keys[index][:, :, position] = key
            self_values[index][:, :, position] = value
            keys, values = self_keys[index][:, :, : position + 1], self_values[index][:, :, : position + 1]
        attended = _attend(query, keys, values, mask, fused=static)
        hidden = hidden + _linear(attended, weights.self_out_w, weights.self_out_b)

        normed = F.layer_norm(hidden, (hidden_size,), weights.ln2_w, weights.ln2_b, prepared.eps)
        query = _linear(normed, weights.cross_q_w, weights.cross_q_b).view(batch, heads, head_dim)
        attended = _attend(query, cross_keys[index], cross_values[index], None, fused=static)
        hidden = hidden + _linear(attended, weights.cross_out_w, weights.cross_out_b)

        normed = F.layer_norm(hidden, (hidden_size,), weights.ln3_w, weights.ln3_b, prepared.eps)
        hidden = hidden + _linear(
            prepared.activation(_linear(normed, weights.fc1_w, weights.fc1_b)), weights.fc2_w, weights.fc2_b
        )
    hidden = F.layer_norm(hidden, (hidden_size,), prepared.final_ln_w, prepared.final_ln_b, prepared.eps)
    if prepared.lm_head_b is None:
        return torch.matmul(hidden, prepared.lm_head_w).float()
    return _linear(hidden, prepared.lm_head_w, prepared.lm_head_b).float()


class Pix2SeqStaticDecoding:
    r"""
    A decoding loop for `Pix2SeqForObjectDetection.generate(..., custom_generate=decoding)`: greedy decoding or
    sampling (as the model's generation config says) over a static cache, with the step of [`decoder_step`].

    transformers prepares everything else (generation config, encoder outputs, logits processors, stopping criteria);
    this loop takes their place in `_sample`, calls the same processors and criteria with the same arguments at every
    step, draws tokens the same way (`argmax`, or `multinomial` of the softmax) and returns the same output
    (`GenerateEncoderDecoderOutput` with `sequences`, and `scores`/`logits` when asked for, or a tensor of tokens).
    Greedy decoding gives the stock loop's tokens (up to float rounding of the logits).

    Differences, by design: images whose sequence has finished (EOS, or a stopping criterion) are dropped from the
    decoder batch (with `drop_finished`), so their raw `logits` after they finished are zeros rather than the model's
    (they are padding; the processors and criteria still see every row, so their state stays per image);
    `output_attentions` / `output_hidden_states` are not supported; the decoder always caches (`use_cache` is ignored).

    The decoder weights are laid out for the step (fused, transposed, cast) once and reused by later calls as long as
    the model's parameters are the same tensors, unchanged (their in-place version counters are checked).

    Args:
        compile (`bool`, *optional*, defaults to `False`):
            Run the step through `torch.compile`: the whole static cache is read and later positions are masked, so
            that every step has the same shapes. The first call for a new batch size or maximum length compiles (tens
            of seconds on a CPU; after one such change torch compiles a dynamic-shape step that serves the rest);
            later calls reuse the compiled step.
        dtype (`torch.dtype`, *optional*):
            Compute dtype of the decoder (weights, activations, caches), e.g. `torch.bfloat16`. Defaults to the
            model's. Logits are float32 either way.
        drop_finished (`bool`, *optional*, defaults to `True`):
            Stop computing images whose sequence has finished (their caches are compacted away).
        freeze_weights (`bool`, *optional*, defaults to `True`):
            With `compile`, make the weights constants of the compiled step (inductor's `freezing`), which lets it pack
            them for its own GEMM kernels: on the CPU of `docs/performance.md` this halves the step time. The step is
            compiled again when the model's weights change.
        compile_kwargs (`dict`, *optional*):
            Arguments of `torch.compile` over the defaults `fullgraph=True, options={"max_autotune": True}` (e.g.
            `{"mode": "reduce-overhead"}` on CUDA, which replaces the default options).
    """

    def __init__(
        self,
        compile: bool = False,
        dtype: torch.dtype | None = None,
        drop_finished: bool = True,
        freeze_weights: bool = True,
        compile_kwargs: dict | None = None,
    ):
        flags = {"compile": compile, "drop_finished": drop_finished, "freeze_weights": freeze_weights}
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, got {value!r}.")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"`dtype` must be a floating-point `torch.dtype`, got {dtype!r}.")
        self.compile = compile
        self.dtype = dtype
        self.drop_finished = drop_finished
        self.freeze_weights = freeze_weights
        self.compile_kwargs = dict(compile_kwargs or {})
        self._prepared = None
        self._prepared_key = None
        self._step = None

    @staticmethod
    def accepts_processor(processor) -> bool:
        """Whether this loop can call `processor`: it passes `input_ids` and `scores` only."""
        return len(inspect.signature(processor.__call__).parameters) <= 2

    def _compile(self, prepared: _PreparedDecoder) -> Callable:
        """
        `torch.compile` of the step, by default with `max_autotune` (on CPU it also tries inductor's own GEMM kernels,
        which for one or a few rows beat the BLAS call) and `fullgraph`; `compile_kwargs` override these (a `mode`
        replaces the default options).
        """
        kwargs = {"fullgraph": True, "options": {"max_autotune": True}}
        if "mode" in self.compile_kwargs:
            kwargs.pop("options")
        kwargs.update(self.compile_kwargs)
        return torch.compile(prepared, **kwargs)

    def _compile_context(self):
        """
        With `freeze_weights`, inductor's `freezing` (the weights become constants of the compiled step, packed for its
        kernels). It is read when the step compiles, at its first call, so it wraps the calls.
        """
        if not (self.compile and self.freeze_weights):
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config

        return inductor_config.patch(freezing=True)

    def _prepare(self, model) -> _PreparedDecoder:
        """
        The prepared decoder of `model` (and its step, compiled with `compile=True`), rebuilt when the model's
        parameters changed (new tensors or in-place updates).
        """
        tensors = [*model.model.decoder.parameters(), *model.lm_head.parameters()]
        try:
            key = (id(model), self.dtype, tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors))
        except RuntimeError:  # inference tensors have no version counter: rebuild every time
            key = None
        if self._prepared is None or key is None or key != self._prepared_key:
            self._prepared = _PreparedDecoder(model, self.dtype)
            self._prepared_key = key
            self._step = self._compile(self._prepared) if self.compile else self._prepared
        return self._prepared

    @torch.no_grad()
    def __call__(
        self,
        model,
        input_ids: torch.LongTensor,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus: bool = False,
        streamer=None,
        **model_kwargs,
    ):
        """
        The decoding loop, called by `generate` (not meant to be called directly).

        Args:
            model (`Pix2SeqForObjectDetection`): the model `generate` was called on.
            input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`): the decoder prompt.
            logits_processor (`LogitsProcessorList`), stopping_criteria (`StoppingCriteriaList`),
            generation_config (`GenerationConfig`): as prepared by `generate`.
            model_kwargs: must hold `encoder_outputs`.

        Returns:
            `GenerateEncoderDecoderOutput` when `generation_config.return_dict_in_generate`, else the token tensor.
        """
        if synced_gpus:
            raise ValueError("`Pix2SeqStaticDecoding` does not support `synced_gpus`.")
        if generation_config.num_beams != 1:
            raise ValueError(
                f"`Pix2SeqStaticDecoding` does greedy decoding and sampling only, got `num_beams="
                f"{generation_config.num_beams}`."
            )
        if generation_config.output_attentions or generation_config.output_hidden_states:
            raise ValueError(
                "`Pix2SeqStaticDecoding` cannot return attentions or hidden states; use the stock `generate` loop."
            )
        encoder_outputs = model_kwargs.get("encoder_outputs")
        if encoder_outputs is None:
            raise ValueError("`Pix2SeqStaticDecoding` needs the `encoder_outputs` that `generate` prepares.")
        if isinstance(encoder_outputs, (tuple, list)):
            memory = encoder_outputs[0]
        else:
            memory = encoder_outputs.last_hidden_state

        batch_size, prompt_length = input_ids.shape
        max_length = stopping_criteria.max_length or generation_config.max_length
        if max_length is None:
            raise ValueError("Set `max_new_tokens` or `max_length`: the static cache needs a maximum length.")
        prepared = self._prepare(model)
        # The last token is never fed back, so the cache holds `max_length - 1` positions.
        cache_length = max(max_length - 1, prompt_length)
        if cache_length > prepared.max_positions:
            raise ValueError(
                f"`max_length={max_length}` needs {cache_length} decoder positions, beyond "
                f"`max_position_embeddings={prepared.max_positions}`."
            )
        step = self._step
        device = input_ids.device
        memory = memory.to(prepared.device)
        cross_keys, cross_values = prepared.cross_keys_values(memory)
        cache_shape = (batch_size, prepared.num_heads, cache_length, prepared.head_dim)
        self_keys = [torch.zeros(cache_shape, dtype=prepared.dtype, device=prepared.device) for _ in prepared.layers]
        self_values = [torch.zeros(cache_shape, dtype=prepared.dtype, device=prepared.device) for _ in prepared.layers]

        pad_token_id = generation_config._pad_token_tensor
        has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        return_dict = generation_config.return_dict_in_generate
        scores = () if (return_dict and generation_config.output_scores) else None
        raw_logits = () if (return_dict and generation_config.output_logits) else None

        sequences = torch.empty((batch_size, max(max_length, prompt_length)), dtype=torch.long, device=device)
        sequences[:, :prompt_length] = input_ids
        length = prompt_length
        unfinished = torch.ones(batch_size, dtype=torch.long, device=device)
        # Rows of the full batch that the decoder still runs (all, until some finish).
        active = None

        # `LogitsProcessorList.__call__` inspects every processor's signature at every step (a tenth of a millisecond
        # per token); this loop passes no extra arguments, so it checks once and calls them directly.
        processors = list(logits_processor)
        for processor in processors:
            if not self.accepts_processor(processor):
                raise ValueError(
                    f"{type(processor).__name__} needs arguments beyond `input_ids` and `scores`, which "
                    "`Pix2SeqStaticDecoding` does not pass; use the stock `generate` loop."
                )

        def run_step(tokens: torch.Tensor, position: int) -> torch.Tensor:
            position_arg = torch.tensor(position, device=prepared.device) if self.compile else position
            return step(tokens.to(prepared.device), position_arg, self_keys, self_values, cross_keys, cross_values)

        # Entered once for the whole loop (the step compiles at its first call), not at every step.
        with self._compile_context():
            # The prompt: all but its last token only fill the cache.
            for position in range(prompt_length - 1):
                run_step(input_ids[:, position], position)

            while length < max_length:
                tokens = sequences[:, length - 1] if active is None else sequences[active, length - 1]
                step_logits = run_step(tokens, length - 1).to(device)
                if active is None:
                    next_token_logits = step_logits
                else:
                    next_token_logits = step_logits.new_zeros((batch_size, step_logits.shape[-1]))
                    next_token_logits[active] = step_logits

                current = sequences[:, :length]
                next_token_scores = next_token_logits
                for processor in processors:
                    next_token_scores = processor(current, next_token_scores)
                if scores is not None:
                    scores += (next_token_scores,)
                if raw_logits is not None:
                    raw_logits += (next_token_logits,)

                if generation_config.do_sample:
                    probs = torch.softmax(next_token_scores, dim=-1)
                    next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
                else:
                    next_tokens = torch.argmax(next_token_scores, dim=-1)
                if has_eos_stopping_criteria:
                    next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
                sequences[:, length] = next_tokens
                length += 1
                if streamer is not None:
                    streamer.put(next_tokens.cpu())

                unfinished = unfinished & ~stopping_criteria(sequences[:, :length], scores)
                if not bool(unfinished.any()):
                    break
                if has_eos_stopping_criteria and self.drop_finished:
                    # Finished rows only get padding from now on: stop computing them.
                    still = unfinished.bool() if active is None else unfinished.bool()[active]
                    if not bool(still.all()):
                        keep = still.nonzero().flatten().to(prepared.device)
                        rows = torch.arange(batch_size, device=device) if active is None else active
                        active = rows[keep.to(device)]
                        self_keys = [cache.index_select(0, keep) for cache in self_keys]
                        self_values = [cache.index_select(0, keep) for cache in self_values]
                        cross_keys = cross_keys.index_select(1, keep)
                        cross_values = cross_values.index_select(1, keep)

        if streamer is not None:
            streamer.end()
        sequences = sequences[:, :length]
        if not return_dict:
            return sequences
        return GenerateEncoderDecoderOutput(
            sequences=sequences,
            scores=scores,
            logits=raw_logits,
            encoder_attentions=encoder_outputs.get("attentions") if hasattr(encoder_outputs, "get") else None,
            encoder_hidden_states=encoder_outputs.get("hidden_states") if hasattr(encoder_outputs, "get") else None,
        )


__all__ = ["Pix2SeqStaticDecoding", "decoder_step"]
