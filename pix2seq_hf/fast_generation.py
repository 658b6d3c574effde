"""The decoding loop `generate` runs by default: the model's own decoder over a static cache, optionally compiled.

[`Pix2SeqStaticDecoding`] replaces transformers' sampling/greedy loop and nothing else: `generate` still prepares the
generation config, runs the encoder once, builds the logits processors (the Pix2Seq grammar first) and the stopping
criteria, so the options, outputs and post-processing are the same as with transformers' loop. What changes:

- the decoder runs over transformers' `StaticCache` (self-attention keys/values in preallocated tensors of the
  maximum length, cross-attention keys/values of the image computed once, at the prompt);
- one step is the model's own decoder layers and output projection on one token (their decoding-step path: stacked
  query/key/value product, in-place cache writes, attention over the filled part of the cache, no mask), with no
  `generate` bookkeeping around it (no input preparation, output objects or cache copies per step), and one host
  synchronisation per token (how many images go on);
- images whose sequence has finished are dropped from the decoder batch (their cache rows are removed), so a batch
  costs what its unfinished images cost;
- with compilation (when `generate` is given a `compile_config`), the single-token step is compiled with
  `torch.compile` over fixed shapes (on CPU with the model's weights frozen into it as constants).

[`Pix2SeqGenerationMixin.generate`] picks this loop unless asked for what only transformers' loop does (beam search,
attentions, hidden states, `use_cache=False`, training mode, ...). Dropout and drop path are not applied (inference).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers.cache_utils import EncoderDecoderCache, StaticCache
from transformers.generation.utils import GenerateEncoderDecoderOutput


def decoder_step(
    model, token_ids: torch.LongTensor, encoder_hidden_states: torch.Tensor, cache, key_length: int | None = None
) -> torch.Tensor:
    """
    One call of the model's decoder and output projection, for the last position of `token_ids`.

    Args:
        model (`Pix2SeqForObjectDetection`): the model.
        token_ids (`torch.LongTensor` of shape `(batch, length)`): the tokens after those in `cache`.
        encoder_hidden_states (`torch.Tensor` of shape `(batch, memory_length, hidden)`): the encoded images (read
            only until the cache holds their cross-attention keys/values).
        cache (`EncoderDecoderCache`): the static cache, updated in place.
        key_length (`int`, *optional*): the cache positions filled after this step, for a single-token step to attend
            to those only (see `Pix2SeqDecoder.decode`); `None` (compiled steps): the whole cache, masked.

    Returns:
        `torch.FloatTensor` of shape `(batch, vocab_size)`: the next-token logits, float32.
    """
    hidden = model.model.decoder.decode(token_ids, encoder_hidden_states, cache=cache, key_length=key_length)
    position = None
    if model.auxiliary_copy is not None:
        # The last token's position: the filled cache positions less one (counted on the device when compiled).
        if key_length is not None:
            position = key_length - 1
        else:
            filled = cache.self_attention_cache.get_seq_length()
            position = torch.as_tensor(filled, device=token_ids.device).reshape(1) - 1
    return model.output_logits(hidden[:, -1:], encoder_hidden_states, position)[:, 0].float()


def static_cache(
    model, memory: torch.Tensor, prompt_length: int, max_length: int | None, extra_positions: int = 0
) -> EncoderDecoderCache:
    """
    An empty static cache for decoding up to `max_length` tokens (prompt included) over the encoded images `memory`
    (`(batch, memory_length, hidden)`): the self-attention keys/values of `max_length - 1` positions (the last token is
    never fed back), plus `extra_positions` slots beyond them, and the cross-attention keys/values of the images.

    Raises:
        `ValueError`: without a maximum length, or for one beyond the model's position embeddings.
    """
    if max_length is None:
        raise ValueError("Set `max_new_tokens` or `max_length`: the static cache needs a maximum length.")
    cache_length = max(max_length - 1, prompt_length)
    max_positions = model.config.max_position_embeddings
    if cache_length > max_positions:
        raise ValueError(
            f"`max_length={max_length}` needs {cache_length} decoder positions, beyond "
            f"`max_position_embeddings={max_positions}`."
        )
    return EncoderDecoderCache(
        StaticCache(config=model.config, max_cache_len=cache_length + extra_positions),
        StaticCache(config=model.config, max_cache_len=memory.shape[1]),
    )


def encoded_images(encoder_outputs) -> torch.Tensor:
    """The encoder's last hidden states from `encoder_outputs` (a model output or a tuple)."""
    return encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else encoder_outputs.last_hidden_state


class Pix2SeqStaticDecoding:
    r"""
    The decoding loop [`Pix2SeqForObjectDetection.generate`] runs by default (also usable explicitly as
    `generate(..., custom_generate=decoding)`): greedy decoding or sampling, as the generation config says, over a
    static cache, each step being [`decoder_step`] (the model's own decoder).

    transformers prepares everything else (generation config, encoder outputs, logits processors, stopping criteria);
    this loop takes the place of `_sample`, calls the same processors and criteria with the same arguments at every
    step, draws tokens the same way (`argmax`, or `multinomial` of the softmax, same generator calls) and returns the
    same output (`GenerateEncoderDecoderOutput` with `sequences`, and `scores`/`logits` when asked for, or a tensor of
    tokens). Greedy decoding and seeded sampling give transformers' tokens (up to float rounding of the logits).

    Differences, by design: images whose sequence has finished (EOS, or a stopping criterion) are dropped from the
    decoder batch (with `drop_finished`), so their raw `logits` after they finished are zeros rather than the model's
    (they are padding; the processors and criteria still see every row, so their state stays per image);
    attentions and hidden states cannot be returned; the decoder always caches; the returned `cache` is the static
    cache, or `None` when finished rows were dropped from it.

    Args:
        compile (`bool`, *optional*):
            Run the single-token step through `torch.compile`. `None` (the default): compile when the generation
            config has a `compile_config` (e.g. `generate(..., compile_config=CompileConfig(fullgraph=True,
            dynamic=False))`, whose arguments are used) and not `disable_compile`. The first call for a new batch
            size or maximum length compiles (tens of seconds on a CPU), later calls reuse the compiled step; it is
            compiled again when the model's weights change (on CPU they are constants of the compiled step). After
            torch's recompilation limit (8 by default) the step runs eagerly.
        drop_finished (`bool`, *optional*, defaults to `True`):
            Stop computing images whose sequence has finished (their cache rows are removed). Without compilation
            only: a compiled step keeps its shapes.
    """

    def __init__(self, compile: bool | None = None, drop_finished: bool = True):
        if compile is not None and not isinstance(compile, bool):
            raise TypeError(f"`compile` must be a bool or None, got {compile!r}.")
        if not isinstance(drop_finished, bool):
            raise TypeError(f"`drop_finished` must be a bool, got {drop_finished!r}.")
        self.compile = compile
        self.drop_finished = drop_finished
        self._compiled = None
        self._compiled_key = None

    @staticmethod
    def accepts_processor(processor) -> bool:
        """Whether this loop can call `processor`: it passes `input_ids` and `scores` only."""
        return len(inspect.signature(processor.__call__).parameters) <= 2

    def _use_compile(self, model, generation_config) -> bool:
        if self.compile is not None:
            return self.compile
        if getattr(generation_config, "disable_compile", False):
            return False
        # Only on request: compiling makes the first call tens of seconds slower than the eager loop.
        return getattr(generation_config, "compile_config", None) is not None

    def _compiled_step(self, model, generation_config) -> Callable:
        """
        `torch.compile` of [`decoder_step`] with the model's weights frozen in (inductor's `freezing`: on CPU it
        then packs them for its own GEMM kernels), built again when the model's parameters changed (new tensors or
        in-place updates).
        """
        compile_kwargs = self._compile_kwargs(model, generation_config)
        tensors = list(model.parameters())
        try:
            weights = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
            key = (id(model), repr(compile_kwargs), weights)
        except RuntimeError:  # inference tensors have no version counter
            key = None
        if self._compiled is None or key is None or key != self._compiled_key:
            self._compiled = torch.compile(lambda *args: decoder_step(*args), **compile_kwargs)
            self._compiled_key = key
        return self._compiled

    @staticmethod
    def _compile_kwargs(model, generation_config) -> dict:
        """
        `torch.compile` arguments: one graph of fixed shapes, from the generation config's `compile_config` where
        given. On CUDA its `mode` applies (by default `"reduce-overhead"`: CUDA graphs); elsewhere, where CUDA graphs do
        not exist, the weights are frozen into the step instead (inductor's `freezing`, plus the config's `options`).
        """
        compile_config = getattr(generation_config, "compile_config", None)
        kwargs = {"fullgraph": True, "dynamic": False}
        options = {}
        if compile_config is not None:
            kwargs.update(fullgraph=compile_config.fullgraph, dynamic=compile_config.dynamic)
            kwargs["backend"] = compile_config.backend
            options = dict(compile_config.options or {})
            if model.device.type == "cuda" and compile_config.mode is not None:
                kwargs["mode"] = compile_config.mode
                return kwargs
        kwargs["options"] = {"freezing": True, **options}
        return kwargs

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
                "`Pix2SeqStaticDecoding` cannot return attentions or hidden states; use transformers' loop "
                "(`custom_generate=None`)."
            )
        encoder_outputs = model_kwargs.get("encoder_outputs")
        if encoder_outputs is None:
            raise ValueError("`Pix2SeqStaticDecoding` needs the `encoder_outputs` that `generate` prepares.")
        memory = encoded_images(encoder_outputs)

        max_length = stopping_criteria.max_length or generation_config.max_length
        cache = static_cache(model, memory, input_ids.shape[1], max_length)
        compiled = self._use_compile(model, generation_config)
        compiled_step = self._compiled_step(model, generation_config) if compiled else None

        def step(token_ids: torch.LongTensor, length: int, keep: torch.LongTensor | None) -> torch.Tensor:
            nonlocal memory
            if keep is not None:
                cache.self_attention_cache.reorder_cache(keep)
                cache.cross_attention_cache.reorder_cache(keep)
                memory = memory.index_select(0, keep.to(memory.device))
            if length == token_ids.shape[1]:
                # The prompt, eagerly: it fills the caches, the cross-attention keys/values included.
                return decoder_step(model, token_ids, memory, cache)
            if compiled_step is not None:
                return compiled_step(model, token_ids, memory, cache)
            # The token goes to position `length - 1`: the step attends to the `length` filled positions.
            return decoder_step(model, token_ids, memory, cache, length)

        for processor in logits_processor:
            if not self.accepts_processor(processor):
                raise ValueError(
                    f"{type(processor).__name__} needs arguments beyond `input_ids` and `scores`, which "
                    "`Pix2SeqStaticDecoding` does not pass; use transformers' loop (`custom_generate=None`)."
                )
        return_dict = generation_config.return_dict_in_generate
        sequences, scores, raw_logits, dropped = decoding_loop(
            step,
            input_ids,
            logits_processor,
            stopping_criteria,
            max_length=max_length,
            do_sample=generation_config.do_sample,
            pad_token_id=generation_config._pad_token_tensor,
            output_scores=bool(return_dict and generation_config.output_scores),
            output_logits=bool(return_dict and generation_config.output_logits),
            drop_finished=self.drop_finished and not compiled,
            streamer=streamer,
        )
        if not return_dict:
            return sequences
        return GenerateEncoderDecoderOutput(
            sequences=sequences,
            scores=scores,
            logits=raw_logits,
            encoder_attentions=encoder_outputs.get("attentions") if hasattr(encoder_outputs, "get") else None,
            encoder_hidden_states=encoder_outputs.get("hidden_states") if hasattr(encoder_outputs, "get") else None,
            # With rows dropped, the cache no longer matches the batch.
            cache=None if dropped else cache,
        )


def decoding_loop(
    step: Callable,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    max_length: int,
    do_sample: bool = False,
    pad_token_id: torch.Tensor | int | None = None,
    output_scores: bool = False,
    output_logits: bool = False,
    drop_finished: bool = True,
    streamer=None,
) -> tuple[torch.LongTensor, tuple | None, tuple | None, bool]:
    """
    The token loop of greedy decoding and sampling, over any decoder step: the one loop of [`Pix2SeqStaticDecoding`]
    (the model's decoder) and of `export.ExportedPix2Seq` (the exported graphs). At each step it calls the logits
    processors and the stopping criteria as transformers' `_sample` does, with the same arguments, and draws the
    next token the same way (`argmax`, or `multinomial` of the softmax).

    Args:
        step (`Callable`): `step(token_ids, length, keep) -> logits` runs the decoder on `token_ids` (the whole prompt
            at the first call, then the last token of each running row) and returns the next-token logits `[rows,
            vocab_size]`; `length` is the number of tokens written so far, the new ones included; `keep`, when not
            `None`, holds the indices (among the rows of the previous call) of the rows still running, whose cache
            the step keeps before running.
        input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`): the prompt.
        logits_processor (`LogitsProcessorList`), stopping_criteria (`StoppingCriteriaList`): called with
            `(input_ids, scores)` of the whole batch.
        max_length (`int`): the most tokens of a sequence, prompt included.
        do_sample (`bool`): sample, rather than take the most likely token.
        pad_token_id (`int` or `torch.Tensor`): the token of rows that finished (with an EOS stopping criterion).
        output_scores, output_logits (`bool`): collect the processed scores / raw logits of each step.
        drop_finished (`bool`): stop running rows whose sequence has finished (EOS stopping criterion only); their
            raw logits from then on are zeros.
        streamer (`BaseStreamer`, *optional*): gets each step's tokens.

    Returns:
        `(sequences, scores, logits, dropped)`: the tokens `[batch_size, length]`, the per-step processed scores and
        raw logits (tuples, or `None` when not asked for), and whether rows were dropped.
    """
    batch_size, prompt_length = input_ids.shape
    device = input_ids.device
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    scores = () if output_scores else None
    raw_logits = () if output_logits else None

    sequences = torch.empty((batch_size, max(max_length, prompt_length)), dtype=torch.long, device=device)
    sequences[:, :prompt_length] = input_ids
    length = prompt_length
    unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
    # Rows of the full batch that the decoder still runs (all, until some finish), and how many.
    active = None
    num_active = batch_size
    # `LogitsProcessorList.__call__` inspects every processor's signature at every step; this loop passes no extra
    # arguments, so it calls them directly.
    processors = list(logits_processor)

    step_logits = step(input_ids, length, None)
    while True:
        if active is None:
            next_token_logits = step_logits
        else:
            next_token_logits = step_logits.new_zeros((batch_size, step_logits.shape[-1]))
            next_token_logits[active] = step_logits

        next_token_scores = next_token_logits
        current = sequences[:, :length]
        for processor in processors:
            next_token_scores = processor(current, next_token_scores)
        if scores is not None:
            scores += (next_token_scores,)
        if raw_logits is not None:
            raw_logits += (next_token_logits,)

        if do_sample:
            probs = torch.softmax(next_token_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_token_scores, dim=-1)
        if has_eos_stopping_criteria:
            next_tokens = torch.where(unfinished, next_tokens, pad_token_id)
        sequences[:, length] = next_tokens
        length += 1
        if streamer is not None:
            streamer.put(next_tokens.cpu())

        unfinished = unfinished & ~stopping_criteria(sequences[:, :length], scores)
        if length >= max_length:
            break
        # The step's one host synchronisation: how many sequences go on.
        num_unfinished = int(unfinished.sum())
        if num_unfinished == 0:
            break
        keep = None
        if has_eos_stopping_criteria and drop_finished and num_unfinished < num_active:
            # Finished rows only get padding from now on: stop computing them.
            still = unfinished if active is None else unfinished[active]
            keep = still.nonzero().flatten()
            num_active = num_unfinished
            active = (torch.arange(batch_size, device=device) if active is None else active)[keep]
        tokens = sequences[:, length - 1 : length] if active is None else sequences[active, length - 1 : length]
        step_logits = step(tokens, length, keep)

    if streamer is not None:
        streamer.end()
    return sequences[:, :length], scores, raw_logits, active is not None


__all__ = ["Pix2SeqStaticDecoding", "decoder_step", "decoding_loop", "static_cache"]
