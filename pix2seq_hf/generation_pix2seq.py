"""Logits processors for Pix2Seq decoding: the token grammar of object sequences and the official top-p rule."""

from __future__ import annotations

import math

import torch
from transformers.generation.logits_process import LogitsProcessor

from .box_codec import Pix2SeqTokenLayout, best_class_scores


# Generation-config attributes read by `Pix2SeqForObjectDetection._get_logits_processor`, with their defaults. They are
# stored as custom entries of the model's `GenerationConfig` (saved in `generation_config.json`) and can be given to
# `generate` as keyword arguments, e.g. `model.generate(pixel_values, eos_bias=-1.0, min_objects=5)`.
PIX2SEQ_GENERATION_DEFAULTS = {
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
    # The score (probability of the best real class at the class token, from the raw logits, as in the detections)
    # under which an object counts towards `early_stop_patience`.
    "early_stop_threshold": 0.0,
    # Use the official code's top-p rule (keep the largest set of tokens whose mass stays <= top_p) instead of the
    # paper's / transformers' rule (the smallest set whose mass reaches top_p).
    "official_top_p": False,
    # Decode as the official evaluation: no Pix2Seq logits processor at all (no grammar, EOS fed back like any token).
    # Set by `official_evaluation.official_evaluation_generation_config`, which also turns off stopping at EOS.
    "official_evaluation": False,
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
        token_grammar: bool = True,
        eos_bias: float = 0.0,
        min_objects: int = 0,
        suppress_eos: bool = False,
        suppress_noise_class: bool = False,
        early_stop_patience: int = 0,
        early_stop_threshold: float = 0.0,
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

    def allowed_tokens(self, num_generated: int) -> torch.BoolTensor:
        """
        The tokens allowed next (for a row that has not ended) after `num_generated` generated tokens.

        Returns:
            `torch.BoolTensor` of shape `[vocab_size]`.
        """
        slot, num_objects = num_generated % 5, num_generated // 5
        if self.token_grammar:
            allowed = self._slot_masks[slot].clone()
        else:
            allowed = torch.ones(self.token_layout.vocab_size, dtype=torch.bool)
            if self.suppress_noise_class:
                allowed[self.token_layout.noise_token_id] = False
        eos_allowed = (
            not self.suppress_eos and num_objects >= self.min_objects and (slot == 0 or not self.token_grammar)
        )
        allowed[self.token_layout.eos_token_id] = eos_allowed
        return allowed

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
        scores = scores.clone()
        if self.eos_bias != 0.0:
            scores[:, eos] += self.eos_bias

        allowed = self.allowed_tokens(num_generated).to(scores.device)
        scores = scores.masked_fill(~allowed, -float("inf"))

        # Rows that already ended keep writing EOS (transformers pads them with it anyway); early-stopped rows end.
        ended = (input_ids[:, self.prompt_length :] == eos).any(dim=1)
        if stop is not None:
            ended = ended | stop
        if num_generated > 0 and bool(ended.any()):
            only_eos = torch.full_like(scores[0], -float("inf"))
            only_eos[eos] = 0.0
            scores = torch.where(ended[:, None], only_eos, scores)
        return scores

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
        slot, num_objects = num_generated % 5, num_generated // 5
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


__all__ = ["PIX2SEQ_GENERATION_DEFAULTS", "Pix2SeqLogitsProcessor", "Pix2SeqTopPLogitsWarper"]
