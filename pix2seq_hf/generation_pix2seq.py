"""
Generation for Pix2Seq: the generation-config defaults and transformers' hooks ([`Pix2SeqGenerationMixin`]), the
logits processors (the token grammar of object sequences, the official top-p rule) and the reading of generated
tokens into DETR-shaped detections.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
from collections.abc import Iterator

import torch
from transformers import GenerationConfig
from transformers.generation import GenerationMixin
from transformers.generation.utils import GenerateBeamEncoderDecoderOutput, GenerateEncoderDecoderOutput
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitNormalization,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    TypicalLogitsWarper,
)

from .box_codec import TOKENS_PER_OBJECT, Pix2SeqTokenLayout, best_class_scores, check_coordinate_window
from .fast_generation import Pix2SeqStaticDecoding
from .speculative_decoding import (
    candidate_generator,
    check_draft_options,
    decode_with_draft,
    resolve_drafter,
)


# The Pix2Seq decoding options, with their defaults (the one place they are written). They are stored as custom entries
# of the model's `GenerationConfig` (saved in `generation_config.json`) and can be given to `generate` as keyword
# arguments, e.g. `model.generate(pixel_values, eos_bias=-1.0, min_objects=5)`.
PIX2SEQ_GENERATION_DEFAULTS = {
    # Decode greedy/sampling requests in the static-cache loop (`fast_generation.Pix2SeqStaticDecoding`: the model's
    # own decoder, no per-step `generate` bookkeeping) whenever it gives the same result; False: transformers' loop.
    "static_decoding": True,
    # Slots 0-3 of an object only coordinate tokens, slot 4 only class (or noise) tokens, EOS only between objects.
    "token_grammar": True,
    # Added to the EOS logit before any masking: negative values make the model write more objects.
    "eos_bias": 0.0,
    # EOS is masked until this many objects have been written.
    "min_objects": 0,
    # EOS is never allowed: every image gets `max_new_tokens // 5` objects (the official code always decodes to the
    # maximum length and lets the scores rank the objects).
    "suppress_eos": False,
    # The noise class token is never sampled (the class read from the logits is a real class either way).
    "suppress_noise_class": False,
    # Early stop for models that never end on their own (sequence augmentation trains them to write noise objects up to
    # the maximum length): an image gets EOS at the next object boundary once this many objects in a row scored below
    # `early_stop_threshold`. 0 turns it off.
    "early_stop_patience": 0,
    # The probability of an object's best real class at its class token (from the raw logits; the detections' score
    # before the coordinate confidence of `coordinate_window`) under which it counts towards `early_stop_patience`.
    "early_stop_threshold": 0.0,
    # Use the official code's top-p rule (keep the largest set of tokens whose mass stays <= top_p) instead of the
    # paper's / transformers' rule (the smallest set whose mass reaches top_p).
    "official_top_p": False,
    # `detect` (hence `model(pixel_values)` and the object-detection pipeline) samples with the random generator seeded
    # to this value on every call, so an image gets the same detections every time; the global random state is left as
    # it was. None: draw from the global random state. `generate` never uses it (the paper's unseeded sampling).
    "detect_seed": 0,
    # How the detections read the model's distributions over the coordinate bins
    # (`box_codec.read_coordinate_distributions`): each box coordinate is the mean bin within this many bins of the
    # written token (sub-bin positions), and an object's score is its class probability times the geometric mean of
    # its four coordinates' probability mass there (well-placed boxes rank first). 0: the written bins and the class
    # probability alone, as the official code reads them. The tokens themselves do not change.
    "coordinate_window": 3,
    # Speculative decoding of whole objects (`speculative_decoding`): "auxiliary" drafts the next objects from the
    # model's auxiliary dense head, "lookahead" from the model's own predictions, and one decoder pass verifies them
    # (same tokens for greedy decoding, same distribution for sampling). None: no draft.
    "draft": None,
}


# The options of `PIX2SEQ_GENERATION_DEFAULTS` that configure `Pix2SeqLogitsProcessor`.
_GRAMMAR_OPTIONS = (
    "token_grammar",
    "eos_bias",
    "min_objects",
    "suppress_eos",
    "suppress_noise_class",
    "early_stop_patience",
    "early_stop_threshold",
)


def pix2seq_generation_options(generation_config, *fallbacks, **given) -> dict:
    """
    Every Pix2Seq decoding option (`PIX2SEQ_GENERATION_DEFAULTS`) with its value: from `given` (keyword arguments of
    a call), else from the first of `generation_config` and `fallbacks` (generation configs) that sets it, else the
    default. Unknown names in `given` are ignored.

    Returns:
        `dict` from option name to value, in the order of `PIX2SEQ_GENERATION_DEFAULTS`.
    """
    options = {}
    for name, default in PIX2SEQ_GENERATION_DEFAULTS.items():
        if name in given:
            options[name] = given[name]
            continue
        sources = (config for config in (generation_config, *fallbacks) if hasattr(config, name))
        options[name] = getattr(next(sources, None), name, default)
    return options


# The paper's sampling settings: nucleus sampling with top-p 0.4 and no top-k (transformers would otherwise add a
# top-50 filter). The model's generation config holds them while it samples; `generate` fills them in whenever it
# samples and they are unset (e.g. a model saved for greedy decoding, whose file leaves them out).
PIX2SEQ_SAMPLING_DEFAULTS = {"top_p": 0.4, "top_k": 0}

# The `generate` options whose other values `detect` refuses, with the value it needs and why: the detection output
# holds one set of detections per image, scored from the raw logits of one sequence, and nothing else.
_DETECTION_OPTIONS = {
    "num_beams": (1, "each object's score is read from the logits of the one sequence written per image"),
    "num_return_sequences": (1, "the detection output holds one set of detections per image"),
    "return_dict_in_generate": (True, "the scores are read from the raw logits of generate's dict output"),
    "output_logits": (True, "the scores are read from the raw logits"),
    "output_scores": (False, "the detection output holds no processed scores"),
    "output_attentions": (False, "the detection output holds no attentions"),
    "output_hidden_states": (False, "the detection output holds no hidden states"),
}


class Pix2SeqLogitsProcessor(LogitsProcessor):
    r"""
    [`LogitsProcessor`] enforcing the structure of Pix2Seq object sequences while decoding.

    Generated tokens (after the detection prompt) come in objects of five slots, `ymin xmin ymax xmax class`. At each
    step the processor looks at the slot of the next token, `(generated tokens so far) % 5`, and sets to `-inf` the
    logits of tokens that cannot appear there:

    - slots 0-3: coordinate tokens only; slot 0 also allows EOS (an object boundary is the only place a sequence may
      end);
    - slot 4: class tokens, plus the noise token unless `suppress_noise_class`;
    - EOS receives `eos_bias` (before masking), is masked while fewer than `min_objects` objects have been written,
      and is never allowed with `suppress_eos`;
    - rows that already wrote EOS may only continue with EOS (= padding), so that their logits stay valid for
      sampling while the rest of the batch finishes;
    - early stop (`early_stop_patience > 0`): a row whose last `early_stop_patience` objects all scored below
      `early_stop_threshold` gets EOS forced at the next object boundary (once it has `min_objects` objects). The
      score of an object is read from this processor's input at the class slot, which must therefore be the raw
      logits (the model puts this processor first).

    Every row of a batch has the same length during generation, so the slot is the same for all rows and the masks
    are computed once per step and broadcast over the batch.

    Args:
        token_layout (`Pix2SeqTokenLayout`):
            Where coordinate, class, noise and EOS tokens live in the vocabulary.
        prompt_length (`int`, *optional*, defaults to 1):
            Number of prompt tokens at the start of `input_ids` (the detection prompt); slots are counted after them.
        token_grammar (`bool`, *optional*, defaults to `True`):
            Apply the slot grammar. Without it only the EOS rules and the noise ban apply.
        eos_bias (`float`, *optional*, defaults to 0.0):
            Added to the EOS logit.
        min_objects (`int`, *optional*, defaults to 0):
            EOS is masked until this many objects have been generated.
        suppress_eos (`bool`, *optional*, defaults to `False`):
            Never allow EOS: decode to the maximum length.
        suppress_noise_class (`bool`, *optional*, defaults to `False`):
            Never allow the noise class token.
        early_stop_patience (`int`, *optional*, defaults to 0):
            End a row after this many consecutive objects scored below `early_stop_threshold` (0: never). Cannot be
            combined with `suppress_eos`.
        early_stop_threshold (`float`, *optional*, defaults to 0.0):
            Score in `[0, 1]` (softmax over the full vocabulary, best real class) under which an object is "low".

    Example:

    ```python
    >>> model.generate(pixel_values, min_objects=1, eos_bias=-0.5)  # configured from generation-config attributes
    ```
    """

    def __init__(
        self,
        token_layout: Pix2SeqTokenLayout,
        prompt_length: int = 1,
        token_grammar: bool = PIX2SEQ_GENERATION_DEFAULTS["token_grammar"],
        eos_bias: float = PIX2SEQ_GENERATION_DEFAULTS["eos_bias"],
        min_objects: int = PIX2SEQ_GENERATION_DEFAULTS["min_objects"],
        suppress_eos: bool = PIX2SEQ_GENERATION_DEFAULTS["suppress_eos"],
        suppress_noise_class: bool = PIX2SEQ_GENERATION_DEFAULTS["suppress_noise_class"],
        early_stop_patience: int = PIX2SEQ_GENERATION_DEFAULTS["early_stop_patience"],
        early_stop_threshold: float = PIX2SEQ_GENERATION_DEFAULTS["early_stop_threshold"],
    ):
        token_layout.validate()
        for name, value in (
            ("token_grammar", token_grammar),
            ("suppress_eos", suppress_eos),
            ("suppress_noise_class", suppress_noise_class),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, got {value!r}.")
        for name, value in (
            ("prompt_length", prompt_length),
            ("min_objects", min_objects),
            ("early_stop_patience", early_stop_patience),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an int, got {value!r}.")
            if value < 0:
                raise ValueError(f"`{name}` must be non-negative, got {value}.")
        if isinstance(eos_bias, bool) or not isinstance(eos_bias, (int, float)):
            raise TypeError(f"`eos_bias` must be a number, got {eos_bias!r}.")
        eos_bias = float(eos_bias)
        if math.isnan(eos_bias) or eos_bias == math.inf:
            raise ValueError(f"`eos_bias` must be a finite number or -inf, got {eos_bias}.")
        if isinstance(early_stop_threshold, bool) or not isinstance(early_stop_threshold, (int, float)):
            raise TypeError(f"`early_stop_threshold` must be a number, got {early_stop_threshold!r}.")
        if not 0.0 <= early_stop_threshold <= 1.0:
            raise ValueError(f"`early_stop_threshold` is a score in [0, 1], got {early_stop_threshold}.")
        if early_stop_patience > 0 and suppress_eos:
            raise ValueError(
                "`early_stop_patience` ends rows with EOS, which `suppress_eos=True` forbids: use one or the other."
            )

        self.token_layout = token_layout
        self.prompt_length = prompt_length
        self.token_grammar = token_grammar
        self.eos_bias = eos_bias
        self.min_objects = min_objects
        self.suppress_eos = suppress_eos
        self.suppress_noise_class = suppress_noise_class
        self.early_stop_patience = early_stop_patience
        self.early_stop_threshold = float(early_stop_threshold)
        # Per row: how many objects in a row scored below the threshold (reset at the start of every generation).
        self._low_score_run: torch.Tensor | None = None

        vocab_size = token_layout.vocab_size
        coordinates = torch.zeros(vocab_size, dtype=torch.bool)
        coordinates[token_layout.coord_token_offset : token_layout.coord_token_end] = True
        classes = torch.zeros(vocab_size, dtype=torch.bool)
        classes[token_layout.class_token_offset : token_layout.class_token_end] = True
        if not suppress_noise_class:
            classes[token_layout.noise_token_id] = True
        # Allowed tokens per slot, before the EOS rules.
        self._slot_masks = torch.stack([coordinates] * 4 + [classes])
        # What one step applies, kept per device: the disallowed tokens of each (slot, EOS allowed) case, and the
        # scores of a row that ended (only EOS).
        self._step_tensors: dict = {}

    @classmethod
    def from_generation_options(
        cls, token_layout: Pix2SeqTokenLayout, options: dict, prompt_length: int = 1
    ) -> Pix2SeqLogitsProcessor:
        """The processor configured by the Pix2Seq decoding options `options` (see `pix2seq_generation_options`)."""
        return cls(token_layout, prompt_length=prompt_length, **{name: options[name] for name in _GRAMMAR_OPTIONS})

    @property
    def is_active(self) -> bool:
        """
        Whether the processor changes anything beyond padding ended rows with EOS (which transformers' loop does
        anyway): `False` with no grammar, no EOS option and no noise ban.
        """
        return (
            self.token_grammar
            or self.eos_bias != 0.0
            or self.min_objects > 0
            or self.suppress_eos
            or self.suppress_noise_class
            or self.early_stop_patience > 0
        )

    def allowed_tokens(self, num_generated: int) -> torch.BoolTensor:
        """
        The tokens allowed next (for a row that has not ended) after `num_generated` generated tokens.

        Returns:
            `torch.BoolTensor` of shape `[vocab_size]`.
        """
        slot = num_generated % TOKENS_PER_OBJECT
        if self.token_grammar:
            allowed = self._slot_masks[slot].clone()
        else:
            allowed = torch.ones(self.token_layout.vocab_size, dtype=torch.bool)
            if self.suppress_noise_class:
                allowed[self.token_layout.noise_token_id] = False
        allowed[self.token_layout.eos_token_id] = self._eos_allowed(num_generated)
        return allowed

    def _eos_allowed(self, num_generated: int) -> bool:
        """Whether a row that has not ended may write EOS after `num_generated` generated tokens."""
        num_objects, slot = divmod(num_generated, TOKENS_PER_OBJECT)
        return not self.suppress_eos and num_objects >= self.min_objects and (slot == 0 or not self.token_grammar)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `[batch_size, sequence_length]`):
                The prompt followed by the tokens generated so far.
            scores (`torch.FloatTensor` of shape `[batch_size, vocab_size]`):
                Logits of the next token.

        Returns:
            `torch.FloatTensor` of shape `[batch_size, vocab_size]`: the processed logits.
        """
        if scores.shape[-1] != self.token_layout.vocab_size:
            raise ValueError(
                f"The scores have {scores.shape[-1]} entries but the token layout has "
                f"`vocab_size={self.token_layout.vocab_size}`."
            )
        num_generated = input_ids.shape[1] - self.prompt_length
        if num_generated < 0:
            raise ValueError(
                f"`input_ids` has {input_ids.shape[1]} tokens, fewer than the prompt length {self.prompt_length}."
            )
        eos = self.token_layout.eos_token_id
        stop = self._early_stop_rows(num_generated, scores) if self.early_stop_patience > 0 else None
        disallowed, eos_allowed = self._disallowed_tokens(num_generated, scores.device)
        scores = scores.masked_fill(disallowed, -float("inf"))
        if self.eos_bias != 0.0 and eos_allowed:
            scores[:, eos] += self.eos_bias

        # Rows that already ended keep writing EOS (transformers pads them with it anyway); early-stopped rows end.
        # Applied to every row without asking whether any ended: no host synchronisation.
        if num_generated > 0:
            ended = (input_ids[:, self.prompt_length :] == eos).any(dim=1)
            if stop is not None:
                ended = ended | stop
            scores = torch.where(ended[:, None], self._step_tensor("only_eos", scores.device), scores)
        return scores

    def process_positions(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, first_length: int
    ) -> torch.FloatTensor:
        """
        The processed scores of consecutive positions of one sequence in one call (a speculative verification pass):
        row `i` is what `self(input_ids[:, :first_length + i], scores[i : i + 1])` gives. Without the early stop,
        which keeps state from call to call (drafting refuses it).

        Args:
            input_ids (`torch.LongTensor` of shape `[1, length]`): the prompt, the tokens written and the drafted ones
                (at least `first_length + rows - 1` tokens).
            scores (`torch.FloatTensor` of shape `[rows, vocab_size]`): the logits of the positions.
            first_length (`int`): the tokens before the first position.

        Returns:
            `torch.FloatTensor` of shape `[rows, vocab_size]`.
        """
        if self.early_stop_patience > 0:
            raise ValueError("`process_positions` cannot apply the early stop, which counts objects call by call.")
        rows = scores.shape[0]
        first = first_length - self.prompt_length
        if first < 0 or input_ids.shape[1] < first_length + rows - 1:
            raise ValueError(
                f"`input_ids` has {input_ids.shape[1]} tokens; {rows} positions from {first_length} need "
                f"{first_length + rows - 1}, after a prompt of {self.prompt_length}."
            )
        cases = [self._disallowed_tokens(first + row, scores.device) for row in range(rows)]
        scores = scores.masked_fill(torch.stack([disallowed for disallowed, _ in cases]), -float("inf"))
        eos = self.token_layout.eos_token_id
        if self.eos_bias != 0.0:
            allowed = torch.tensor([eos_allowed for _, eos_allowed in cases], device=scores.device)
            scores[:, eos] += allowed * self.eos_bias
        # Row i has ended when an EOS is among its first + i generated tokens.
        generated = input_ids[0, self.prompt_length : first_length + rows - 1]
        eos_seen = torch.cat([generated.new_zeros(1), (generated == eos).cumsum(0)])[first : first + rows]
        return torch.where((eos_seen > 0)[:, None], self._step_tensor("only_eos", scores.device), scores)

    def _disallowed_tokens(self, num_generated: int, device: torch.device) -> tuple[torch.BoolTensor, bool]:
        """The complement of [`~allowed_tokens`] on `device` (built once per case), and whether EOS is allowed."""
        eos_allowed = self._eos_allowed(num_generated)
        key = (num_generated % TOKENS_PER_OBJECT if self.token_grammar else None, eos_allowed, device)
        disallowed = self._step_tensors.get(key)
        if disallowed is None:
            disallowed = self._step_tensors[key] = (~self.allowed_tokens(num_generated)).to(device)
        return disallowed, eos_allowed

    def _step_tensor(self, name: str, device: torch.device) -> torch.Tensor:
        tensor = self._step_tensors.get((name, device))
        if tensor is None:
            tensor = torch.full((self.token_layout.vocab_size,), -float("inf"), device=device)
            tensor[self.token_layout.eos_token_id] = 0.0
            self._step_tensors[(name, device)] = tensor
        return tensor

    def _early_stop_rows(self, num_generated: int, raw_scores: torch.FloatTensor) -> torch.BoolTensor | None:
        """
        Tracks the run of low-scoring objects of each row and says which rows must end now.

        At a class slot, the score of the object being written is the probability of its best real class under the
        raw logits (softmax over the full vocabulary); a score below `early_stop_threshold` extends the row's run, any
        other score resets it. At an object boundary (after at least `min_objects` objects), rows whose run reached
        `early_stop_patience` must end.

        Returns:
            `torch.BoolTensor` of shape `[batch_size]` at object boundaries, else `None`.
        """
        batch_size = raw_scores.shape[0]
        run = self._low_score_run
        if num_generated == 0 or run is None or run.shape[0] != batch_size or run.device != raw_scores.device:
            run = self._low_score_run = torch.zeros(batch_size, dtype=torch.long, device=raw_scores.device)
        num_objects, slot = divmod(num_generated, TOKENS_PER_OBJECT)
        if slot == 4:
            score, _ = best_class_scores(raw_scores, self.token_layout)
            self._low_score_run = torch.where(score < self.early_stop_threshold, run + 1, torch.zeros_like(run))
            return None
        if slot == 0 and num_objects > 0 and num_objects >= self.min_objects:
            return run >= self.early_stop_patience
        return None


class Pix2SeqTopPLogitsWarper(LogitsProcessor):
    r"""
    Top-p (nucleus) filtering as the official Pix2Seq code does it: keep the largest set of most likely tokens whose
    cumulative probability stays at or below `top_p` (always at least the most likely token, and every token tied with
    the last one kept).

    transformers' [`TopPLogitsWarper`] (and the paper) keep the *smallest* set whose mass reaches `top_p`, which is
    one token more in general. Select this rule with `model.generate(..., official_top_p=True)`.

    Args:
        top_p (`float`):
            Probability mass, in `(0, 1]`.
        filter_value (`float`, *optional*, defaults to `-inf`):
            Value given to the filtered logits.
    """

    def __init__(self, top_p: float, filter_value: float = -float("inf")):
        top_p = float(top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"`top_p` must be in (0, 1], got {top_p}.")
        self.top_p = top_p
        self.filter_value = filter_value

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        sorted_logits = torch.sort(scores, dim=-1, descending=True).values
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        num_kept = (cumulative <= self.top_p).sum(dim=-1).clamp(min=1)
        threshold = sorted_logits.gather(-1, (num_kept - 1)[:, None])
        return scores.masked_fill(scores < threshold, self.filter_value)


# ---------------------------------------------------------------------------------------------------------------------
# Detections and the generation mixin
# ---------------------------------------------------------------------------------------------------------------------


def logits_of_returned_sequences(logits: torch.Tensor, beam_indices: torch.Tensor, num_generated: int) -> torch.Tensor:
    """
    Logits `[batch_size * num_beams, T, V]` of a beam search -> `[num_sequences, num_generated, V]`: for each returned
    sequence and step, the row of the beam that wrote its token (`beam_indices`, `-1` once the sequence has ended:
    those steps come after its EOS and are never read).
    """
    if beam_indices.ndim != 2 or beam_indices.shape[1] < num_generated or logits.shape[1] < num_generated:
        raise ValueError(
            f"The beam-search output does not fit together: {num_generated} generated tokens, `beam_indices` "
            f"{tuple(beam_indices.shape)}, logits {tuple(logits.shape)}."
        )
    rows = beam_indices[:, :num_generated].long().clamp(min=0).to(logits.device)
    steps = torch.arange(num_generated, device=logits.device).expand_as(rows)
    return logits[rows, steps]


# What the model builds once per `generate` call (stacked / transposed decoding weights, the single-token step, the
# auxiliary copy's per-image inputs; see `decoding_weights_cache`).
DECODING_WEIGHTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "pix2seq_decoding_weights", default=None
)


@contextlib.contextmanager
def decoding_weights_cache() -> Iterator[None]:
    """
    Keeps the weights that the model's decoding layers stack (`concatenated_parameters`), the decoder's single-token
    step and what the auxiliary copy reads of each image's cells for the duration of the block, one `generate` call,
    and drops them at its end. The parameters cannot change during a call, while between calls an optimizer may
    update them in place without a trace (fused AdamW does not bump tensors' version counters), so nothing is kept
    longer.
    Nested blocks share the outermost one's weights.
    """
    if DECODING_WEIGHTS.get() is not None:
        yield
        return
    token = DECODING_WEIGHTS.set({})
    try:
        yield
    finally:
        DECODING_WEIGHTS.reset(token)


class Pix2SeqGenerationMixin(GenerationMixin):
    """
    `generate` for Pix2Seq: transformers' [`GenerationMixin`] with the Pix2Seq generation defaults, the Pix2Seq
    decoding options (`PIX2SEQ_GENERATION_DEFAULTS`) as generation-config attributes, [`Pix2SeqLogitsProcessor`] first
    among the logits processors, and greedy decoding / sampling in [`Pix2SeqStaticDecoding`] (the model's own decoder
    over a static cache) whenever it gives the same result as transformers' loop; beam search, attentions, hidden
    states, `use_cache=False`, a `cache_implementation`, flex attention, training mode, `static_decoding=False` and the
    other options only transformers' loop supports run there. Also [`~detect`]: `generate`, then the detections read
    out of the tokens.

    Expects the model to have `config` (a `Pix2SeqConfig`) and `box_codec`.
    """

    # ----- generation config -----------------------------------------------------------------------------------------

    @staticmethod
    def default_generation_config(config, base: GenerationConfig | None = None) -> GenerationConfig:
        """
        The generation defaults of Pix2Seq: nucleus sampling with top-p 0.4 and no top-k (the paper's setting), up to
        `5 * max_objects` new tokens, the detection prompt as decoder start, EOS/padding, a dict output with the raw
        logits (the scores of the objects are read from them), and `PIX2SEQ_GENERATION_DEFAULTS`.

        Args:
            config (`Pix2SeqConfig`): the model config.
            base (`GenerationConfig`, *optional*): a generation config to update (copied).

        Returns:
            `GenerationConfig`.
        """
        generation_config = copy.deepcopy(base) if base is not None else GenerationConfig()
        generation_config.update(
            do_sample=True,
            **PIX2SEQ_SAMPLING_DEFAULTS,
            max_new_tokens=config.token_layout.max_sequence_length,
            bos_token_id=config.bos_token_id,
            decoder_start_token_id=config.decoder_start_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        for name, value in PIX2SEQ_GENERATION_DEFAULTS.items():
            setattr(generation_config, name, value)
        generation_config._from_model_config = False
        generation_config._original_object_hash = hash(generation_config)
        return generation_config

    def adjust_generation_fn(self, generation_config, *args, **kwargs):
        """
        Loads the checkpoint's `generation_config.json` (see `GenerationMixin`). A checkpoint without one gets the
        Pix2Seq defaults rather than transformers' generic ones; a file without the Pix2Seq decoding options gets
        their defaults.
        """
        super().adjust_generation_fn(generation_config, *args, **kwargs)
        if self.generation_config is None:
            return
        if getattr(self.generation_config, "_from_model_config", False):
            self.generation_config = self.default_generation_config(self.config)
        for name, value in pix2seq_generation_options(self.generation_config).items():
            setattr(self.generation_config, name, value)

    @staticmethod
    def without_idle_sampling_defaults(generation_config: GenerationConfig) -> GenerationConfig:
        """
        `generation_config` without the paper's sampling settings (`PIX2SEQ_SAMPLING_DEFAULTS`) when it does not
        sample: what `save_pretrained` writes and `generate` starts from, so that a model switched to greedy decoding
        (`model.generation_config.do_sample = False`) saves, and generates without transformers' warning about
        sampling-only flags. `generate` fills them in again when sampling is turned back on. Other values are kept.

        Returns:
            `GenerationConfig`: `generation_config` itself, or a copy without those settings.
        """
        if generation_config is None or generation_config.do_sample is True:
            return generation_config
        unset = [
            name for name, value in PIX2SEQ_SAMPLING_DEFAULTS.items() if getattr(generation_config, name) == value
        ]
        if not unset:
            return generation_config
        generation_config = copy.deepcopy(generation_config)
        for name in unset:
            setattr(generation_config, name, None)
        return generation_config

    def _prepare_generation_config(self, generation_config, **kwargs):
        # The Pix2Seq decoding options are not `GenerationConfig` fields: take them out of the keyword arguments
        # (transformers would treat them as model inputs) and set them on the prepared config, defaults first.
        options = {name: kwargs.pop(name) for name in PIX2SEQ_GENERATION_DEFAULTS if name in kwargs}
        # A plain tensor output has no logits: don't let the configured `output_logits=True` warn about it.
        if kwargs.get("return_dict_in_generate") is False:
            kwargs.setdefault("output_logits", False)
        # transformers starts from `self.generation_config`: a greedy one without the idle sampling settings.
        model_config = self.generation_config
        self.generation_config = self.without_idle_sampling_defaults(model_config)
        try:
            # The paper's sampling settings replace transformers' global defaults where neither the call nor the
            # model's config sets them.
            base = generation_config if generation_config is not None else self.generation_config
            sampling_defaults = {
                name: value
                for name, value in PIX2SEQ_SAMPLING_DEFAULTS.items()
                if name not in kwargs
                and getattr(base, name, None) is None
                and getattr(self.generation_config, name, None) is None
            }
            generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        finally:
            self.generation_config = model_config
        if generation_config.do_sample:
            for name, value in sampling_defaults.items():
                setattr(generation_config, name, value)
        for name, value in pix2seq_generation_options(generation_config, self.generation_config, **options).items():
            setattr(generation_config, name, value)
        # Checked once per call: transformers skips its top-p warper for `top_p >= 1` and accepts 0.
        top_p = generation_config.top_p
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"`top_p` is the probability mass kept when sampling, in (0, 1]; got {top_p!r}.")
        check_coordinate_window(generation_config.coordinate_window)
        generation_config.draft = resolve_drafter(generation_config.draft)
        return generation_config, model_kwargs

    def _prepare_special_tokens(self, generation_config, kwargs_has_attention_mask=None, device=None, batch_size=None):
        # Images have no attention mask and the decoder prompt is never padded: transformers' warning that padding
        # (= EOS here, by design) cannot be told from the prompt concerns text prompts only.
        super()._prepare_special_tokens(generation_config, None, device=device, batch_size=batch_size)

    def _get_logits_processor(self, generation_config, *args, **kwargs) -> LogitsProcessorList:
        """
        transformers' processors and warpers, with [`Pix2SeqLogitsProcessor`] first (before any warper) unless the
        options leave it nothing to do (no grammar, no EOS option, no noise ban: EOS is then a token like any other,
        as in the official evaluation) and, with `official_top_p=True`, [`Pix2SeqTopPLogitsWarper`] in place of
        transformers' top-p warper.
        """
        options = pix2seq_generation_options(generation_config)
        use_official_top_p = (
            bool(options["official_top_p"])
            and generation_config.do_sample
            and generation_config.top_p is not None
            and generation_config.top_p < 1.0
        )
        hf_config = generation_config
        if use_official_top_p:
            hf_config = copy.copy(generation_config)
            hf_config.top_p = None
        processors = super()._get_logits_processor(hf_config, *args, **kwargs)

        # A `Pix2SeqLogitsProcessor` passed to `generate(logits_processor=...)` replaces the configured one.
        grammar = [p for p in processors if isinstance(p, Pix2SeqLogitsProcessor)]
        if not grammar:
            processor = Pix2SeqLogitsProcessor.from_generation_options(self.config.token_layout, options)
            grammar = [processor] if processor.is_active else []
        processors = LogitsProcessorList(grammar + [p for p in processors if p not in grammar])
        if use_official_top_p:
            # Same place as transformers' top-p: after temperature/top-k, before min-p and the other warpers.
            later = (MinPLogitsWarper, TypicalLogitsWarper, EpsilonLogitsWarper, EtaLogitsWarper, LogitNormalization)
            index = next((i for i, p in enumerate(processors) if isinstance(p, later)), len(processors))
            processors.insert(index, Pix2SeqTopPLogitsWarper(generation_config.top_p))
        return processors

    # ----- the decoding loop -----------------------------------------------------------------------------------------

    @property
    def static_decoding(self) -> Pix2SeqStaticDecoding:
        """The static-cache loop of this model (kept: it holds the compiled step when compilation is on)."""
        decoding = self.__dict__.get("_pix2seq_static_decoding")
        if decoding is None:
            decoding = self.__dict__["_pix2seq_static_decoding"] = Pix2SeqStaticDecoding()
        return decoding

    def static_decoding_applies(self, generation_config, logits_processor=None, model_kwargs=None) -> bool:
        """
        Whether greedy decoding / sampling with `generation_config` (as prepared by `generate`), `logits_processor`
        and `model_kwargs` gives the same result in [`Pix2SeqStaticDecoding`] as in transformers' loop.
        """
        if self.training or not pix2seq_generation_options(generation_config)["static_decoding"]:
            return False
        if generation_config.output_attentions or generation_config.output_hidden_states:
            return False
        if generation_config.use_cache is False or generation_config.cache_implementation is not None:
            return False
        if (model_kwargs or {}).get("use_cache") is False:
            return False
        # Flex attention over a static cache gives other tokens than over transformers' dynamic cache (transformers'
        # own `cache_implementation="static"` route too): decode it in transformers' loop.
        if self.config._attn_implementation == "flex_attention":
            return False
        return all(Pix2SeqStaticDecoding.accepts_processor(processor) for processor in logits_processor or [])

    def _sample(
        self,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus: bool = False,
        streamer=None,
        inputs_tensor=None,
        **model_kwargs,
    ):
        """
        Greedy decoding and sampling, in [`Pix2SeqStaticDecoding`] where it applies, else in transformers' loop; with
        a `draft`, verified over a static cache where the static loop applies, else by transformers' assisted
        decoding, with the draft as candidates ([`speculative_decoding`]).
        """
        static = not synced_gpus and self.static_decoding_applies(generation_config, logits_processor, model_kwargs)
        if getattr(generation_config, "draft", None) is not None:
            check_draft_options(self, generation_config)
            return decode_with_draft(
                self,
                static,
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                synced_gpus=synced_gpus,
                streamer=streamer,
                inputs_tensor=inputs_tensor,
                **model_kwargs,
            )
        if static:
            return self.static_decoding(
                self,
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                streamer=streamer,
                **model_kwargs,
            )
        return super()._sample(
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            synced_gpus=synced_gpus,
            streamer=streamer,
            **model_kwargs,
        )

    def _get_candidate_generator(
        self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs, **kwargs
    ):
        """The drafted objects as candidates when a `draft` is asked for (see [`speculative_decoding`])."""
        if getattr(generation_config, "draft", None) is None:
            return super()._get_candidate_generator(
                generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs, **kwargs
            )
        return candidate_generator(self, generation_config, input_ids, inputs_tensor, model_kwargs)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """
        [`GenerationMixin.generate`]. Its dict output (the default) with the raw `logits` (the default) also carries
        the detections read out of the sequences: a [`Pix2SeqGenerateOutput`] (or [`Pix2SeqGenerateBeamOutput`]
        for beam search) whose `detections` is a [`Pix2SeqObjectDetectionOutput`], one row per returned sequence. The
        decoding layers' stacked weights are built once for the call ([`decoding_weights_cache`]).
        """
        # The output classes live beside the model, whose module imports this one.
        from .modeling_pix2seq import Pix2SeqGenerateBeamOutput, Pix2SeqGenerateOutput

        with decoding_weights_cache():
            outputs = super().generate(inputs, *args, **kwargs)
        if isinstance(outputs, (GenerateEncoderDecoderOutput, GenerateBeamEncoderDecoderOutput)):
            if outputs.get("logits") is not None and outputs.get("detections") is None:
                beam = isinstance(outputs, GenerateBeamEncoderDecoderOutput)
                output_class = Pix2SeqGenerateBeamOutput if beam else Pix2SeqGenerateOutput
                given = {"coordinate_window": kwargs["coordinate_window"]} if "coordinate_window" in kwargs else {}
                options = pix2seq_generation_options(kwargs.get("generation_config"), self.generation_config, **given)
                detections = self.detections_from_generation(outputs, coordinate_window=options["coordinate_window"])
                outputs = output_class(**outputs, detections=detections)
        return outputs

    # ----- detection -------------------------------------------------------------------------------------------------

    def detect(self, pixel_values: torch.FloatTensor, **generate_kwargs) -> Pix2SeqObjectDetectionOutput:
        """
        Detects objects: `generate` with the model's generation config (overridable with `generate_kwargs`), then
        [`~detections_from_generation`].

        Sampling draws from the random generator seeded to `detect_seed` (a generation-config attribute, 0 by default)
        on every call, so the same images give the same detections on every call; the global random state is left
        as it was. `detect_seed=None` draws from the global random state, as `generate` always does.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`)
            generate_kwargs: options for `generate` (e.g. `top_p=0.4`, `min_objects=1`, `do_sample=False`,
                `detect_seed=3`).

        Returns:
            [`Pix2SeqObjectDetectionOutput`].

        Raises:
            `ValueError` naming an option whose result the detection output cannot hold: `num_beams` or
            `num_return_sequences` above 1, `return_dict_in_generate=False`, `output_logits=False`, `output_scores`,
            `output_attentions` or `output_hidden_states` (call `generate` for those).
        """
        generation_config = generate_kwargs.get("generation_config") or self.generation_config
        for name, (needed, why) in _DETECTION_OPTIONS.items():
            value = generate_kwargs.get(name, getattr(generation_config, name, None))
            if value is not None and value != needed:
                raise ValueError(
                    f"`detect` (and `model(pixel_values)`) cannot honour `{name}={value!r}`: {why}. Call "
                    "`model.generate(...)` for it and read the detections with "
                    "`processor.post_process_object_detection`."
                )
        seed = pix2seq_generation_options(generation_config, **generate_kwargs)["detect_seed"]
        generate_kwargs.pop("detect_seed", None)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"`detect_seed` must be a non-negative int or None, got {seed!r}.")
        generate_kwargs = {**generate_kwargs, "return_dict_in_generate": True, "output_logits": True}
        with seeded_random_state(seed, pixel_values.device):
            return self.generate(pixel_values, **generate_kwargs).detections

    def detections_from_generation(
        self, generate_output, coordinate_window: int | None = None
    ) -> Pix2SeqObjectDetectionOutput:
        """
        Turns a `generate` output (with `sequences` and the raw per-step `logits`) into DETR-shaped detections, read by
        `Pix2SeqBoxCodec.decode_groups` (box from the coordinate tokens and, within `coordinate_window` bins of each,
        the logits; class and score from the raw logits at the class token, restricted to the real classes; reading
        stops at the first EOS).

        A beam-search output gives each returned sequence the logits of the beams that wrote its tokens
        (`beam_indices`).

        Args:
            generate_output: a `generate` dict output with `sequences` and `logits`.
            coordinate_window (`int`, *optional*): see the `coordinate_window` decoding option; `None`: the model's
                generation config's.

        Returns:
            [`Pix2SeqObjectDetectionOutput`] with `N = max(config.max_objects, most objects in an image)` slots, the
            objects of each image first, in the order the model wrote them.
        """
        if coordinate_window is None:
            coordinate_window = pix2seq_generation_options(self.generation_config)["coordinate_window"]
        return detections_from_tokens(generate_output, self.box_codec, coordinate_window, self.config.max_objects)


def detections_from_tokens(
    generate_output, box_codec, coordinate_window: int, min_slots: int
) -> Pix2SeqObjectDetectionOutput:
    """
    The detections of a `generate` output, read by `box_codec.decode_groups` with `coordinate_window`, in
    `max(min_slots, most objects in an image)` slots: what [`Pix2SeqGenerationMixin.detections_from_generation`]
    returns, for the model and for runners of exported graphs alike.

    Args:
        generate_output: a `generate` dict output with `sequences` and the raw `logits`.
        box_codec (`Pix2SeqBoxCodec`): the model's codec.
        coordinate_window (`int`): the `coordinate_window` decoding option.
        min_slots (`int`): the model's `max_objects`.

    Returns:
        `Pix2SeqObjectDetectionOutput`.
    """
    from .modeling_pix2seq import Pix2SeqObjectDetectionOutput

    tokens, logits = generated_tokens_and_logits(generate_output)
    if logits is None:
        raise ValueError(
            "The `generate` output has no raw `logits`; call `generate(..., return_dict_in_generate=True, "
            "output_logits=True)` (the model's defaults)."
        )
    decoded = box_codec.decode_groups(tokens, logits, coordinate_window=coordinate_window)
    return Pix2SeqObjectDetectionOutput.from_decoded(decoded, generate_output["sequences"], min_slots=min_slots)


def generated_tokens_and_logits(generate_output) -> tuple[torch.LongTensor, torch.FloatTensor | None]:
    """
    The generated tokens of a `generate` dict output, without the decoder prompt, and the raw logits that wrote them.

    The per-step `logits` tuple is stacked; a beam-search output (with `beam_indices`) gives each returned sequence
    the logits of the beam that wrote each of its tokens.

    Args:
        generate_output: a `generate` dict output (or a mapping) with `sequences` (`[B, prompt + T]`) and, optionally,
            `logits` (tuple of `T` tensors `[B * beams, V]`, or one tensor `[B, T, V]`) and `beam_indices`.

    Returns:
        `(tokens, logits)`: `[B, T]` and `[B, T, V]`, or, without logits, the sequences as given and `None`.
    """
    read = generate_output.get if hasattr(generate_output, "get") else lambda name: getattr(generate_output, name, None)
    sequences, logits, beam_indices = read("sequences"), read("logits"), read("beam_indices")
    if not isinstance(sequences, torch.Tensor):
        raise TypeError(f"Expected a LongTensor of token ids or a `generate` output, got {type(generate_output)}.")
    if sequences.ndim != 2:
        raise ValueError(f"`sequences` must have shape [batch_size, length], got {tuple(sequences.shape)}.")
    if logits is None:
        return sequences, None
    if isinstance(logits, (tuple, list)):
        logits = torch.stack(tuple(logits), dim=1)
    if beam_indices is not None:
        logits = logits_of_returned_sequences(logits, beam_indices, sequences.shape[1] - 1)
    if logits.ndim != 3 or logits.shape[0] != sequences.shape[0] or logits.shape[1] > sequences.shape[1]:
        raise ValueError(
            f"`logits` must have shape [batch_size, steps, vocab_size] with at most as many steps as `sequences` "
            f"{tuple(sequences.shape)} has tokens, got {tuple(logits.shape)}."
        )
    # `generate` returns the prompt followed by one token per step; the logits cover the steps only.
    return sequences[:, sequences.shape[1] - logits.shape[1] :], logits


@contextlib.contextmanager
def seeded_random_state(seed: int | None, device: torch.device | str):
    """
    A context in which torch's CPU random generator and, for an accelerator `device`, that device's generator start
    from `seed`, and get their former state back on exit; with `seed=None` it changes nothing. transformers' sampling
    draws with `torch.multinomial` from these global generators, which this seeds for one call without disturbing them
    (nor initialising an accelerator the call does not use).
    """
    if seed is None:
        yield
        return
    device = torch.device(device)
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    device_module = torch.get_device_module(device.type)
    if not (hasattr(device_module, "device") and hasattr(device_module, "current_device")):
        # A backend without per-device generators (e.g. MPS): its generator is seeded and not restored.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
        return
    index = device.index if device.index is not None else device_module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type), device_module.device(index):
        torch.default_generator.manual_seed(seed)
        device_module.manual_seed(seed)  # the generator of the current device, `index`
        yield


__all__ = [
    "PIX2SEQ_GENERATION_DEFAULTS",
    "PIX2SEQ_SAMPLING_DEFAULTS",
    "Pix2SeqGenerationMixin",
    "Pix2SeqLogitsProcessor",
    "Pix2SeqTopPLogitsWarper",
    "detections_from_tokens",
    "generated_tokens_and_logits",
    "logits_of_returned_sequences",
    "pix2seq_generation_options",
]
