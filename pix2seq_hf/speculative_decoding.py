"""
Speculative decoding of whole objects: a drafter proposes the tokens of the next objects and one decoder pass over the
draft verifies them, so that an image costs fewer decoder passes than tokens.

Drafters:

- `draft="auxiliary"` ([`Pix2SeqAuxiliaryDrafter`]): the model's auxiliary dense head (trained by the default recipe).
  After the encoder, its per-cell boxes and classes are turned into detections (score threshold and non-maximum
  suppression), put in the order the model writes objects (`"dist2ori"`, the default recipe's, for the string option;
  a drafter built with the processor's `object_order` for others) and quantised exactly as the decoder's tokens.
- `draft="lookahead"` ([`Pix2SeqLookaheadDrafter`]): no drafted objects, for models without the head.

Either way, a verification pass that rejects a drafted token also yields the model's predictions at the positions
after it, and these start the next draft (as in Jacobi decoding; [`Pix2SeqObjectCandidateGenerator`]).

The verification ([`verify_drafts`], in the static-cache loop, the images of a batch together; transformers' assisted
generation, `GenerationMixin._assisted_decoding`, image after image where that loop does not apply) takes the draft
of [`Pix2SeqObjectCandidateGenerator`]: the decoder runs once over the draft, the longest prefix of the draft that
the model would have written itself is kept plus the model's own next token, and the cache is cut back past it.

- Greedy decoding: the tokens are those of decoding without a draft (a drafted token is kept only when it is the
  argmax of the model's processed logits at its position).
- Sampling (top-p, ...): the speculative-sampling rule ([`accept_sampled_draft`]). A drafted object's tokens are
  deterministic (kept with the model's probability of them); the predictions after a rejected token are draws from
  the model's processed distributions there, and each is kept with probability `min(1, p / q)` of the model's
  probability `p` of it over the one `q` it was drawn with, which is close to 1 where the rejected token hardly
  changed the distribution. At the first rejection the model's token is drawn from what is left of its distribution.
  The output distribution is that of decoding without a draft (the random draws differ, so a seeded call gives
  other, equally distributed tokens).

[`acceptance_statistics`] counts the decoder passes and accepted tokens.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.utils import GenerateEncoderDecoderOutput

from .auxiliary_dense_head import cell_boxes
from .box_codec import OBJECT_ORDERS, Pix2SeqBoxCodec
from .fast_generation import Pix2SeqStaticDecoding, encoded_images, static_cache


@dataclass
class DraftStatistics:
    """
    Counts of speculative decoding over the `generate` calls of an [`acceptance_statistics`] block.

    Args:
        sequences (`int`): images decoded with a draft.
        passes (`int`): decoder passes (one per verification, drafted or not; the first also reads the prompt).
        drafted_tokens (`int`): tokens proposed by the drafter.
        accepted_tokens (`int`): proposed tokens the model kept.
        generated_tokens (`int`): tokens written (accepted ones plus one token of the model's own per pass).
    """

    sequences: int = 0
    passes: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    generated_tokens: int = 0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens written per decoder pass (1.0 without any accepted draft token)."""
        return self.generated_tokens / self.passes if self.passes else math.nan

    @property
    def acceptance_rate(self) -> float:
        """Share of the drafted tokens that the model kept."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else math.nan

    @property
    def passes_per_image(self) -> float:
        """Decoder passes per image (without drafting: one per generated token)."""
        return self.passes / self.sequences if self.sequences else math.nan

    def to_dict(self) -> dict:
        """The counts and the three ratios, for reports."""
        counts = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {
            **counts,
            "tokens_per_pass": self.tokens_per_pass,
            "acceptance_rate": self.acceptance_rate,
            "passes_per_image": self.passes_per_image,
        }


_STATISTICS: contextvars.ContextVar[DraftStatistics | None] = contextvars.ContextVar(
    "pix2seq_draft_statistics", default=None
)


@contextlib.contextmanager
def acceptance_statistics() -> Iterator[DraftStatistics]:
    """
    Counts the decoder passes and the drafted and accepted tokens of the drafted `generate` calls made in the block.

    Example:

    ```python
    >>> with acceptance_statistics() as statistics:
    ...     model.generate(pixel_values, draft="auxiliary")
    >>> statistics.tokens_per_pass, statistics.passes_per_image
    ```
    """
    statistics = DraftStatistics()
    token = _STATISTICS.set(statistics)
    try:
        yield statistics
    finally:
        _STATISTICS.reset(token)


# Objects per verification pass when the drafter does not set it. Measured on the default training run's model (batch
# 1, 2 CPU threads): greedy decoding is fastest with 4 (kept drafted tokens are many and the Jacobi predictions after a
# rejection start the next draft), top-p sampling with 2 (1.39x against 1.28x with 1 and 1.33x with 4: a drafted
# object's tokens are kept only as often as the sample would hit them, so a pass keeps fewer tokens than greedy's).
DEFAULT_OBJECTS_PER_PASS = {"greedy": 4, "sampling": 2}


class Pix2SeqLookaheadDrafter:
    """
    Drafts no objects of its own: the draft of every pass is the model's predictions from the last pass (see
    [`Pix2SeqObjectCandidateGenerator`]), topped up with copies of the last object written. Needs no auxiliary head
    (`draft="lookahead"`), so it serves models without one, such as converted official checkpoints.

    Args:
        objects_per_pass (`int`, *optional*): how many objects' worth of tokens one verification pass checks at most;
            by default [`DEFAULT_OBJECTS_PER_PASS`] of the decoding mode (4 for greedy decoding, 2 for sampling).
    """

    def __init__(self, objects_per_pass: int | None = None):
        if objects_per_pass is not None and (
            isinstance(objects_per_pass, bool) or not isinstance(objects_per_pass, int) or objects_per_pass < 1
        ):
            raise ValueError(f"`objects_per_pass` of the draft must be a positive int, got {objects_per_pass!r}.")
        self.objects_per_pass = objects_per_pass

    def objects_per_pass_for(self, do_sample: bool) -> int:
        """The objects one verification pass checks at most, for sampling (`do_sample`) or greedy decoding."""
        if self.objects_per_pass is not None:
            return self.objects_per_pass
        return DEFAULT_OBJECTS_PER_PASS["sampling" if do_sample else "greedy"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(objects_per_pass={self.objects_per_pass})"

    @staticmethod
    def check_model(model) -> None:
        """Raises `ValueError` when `model` cannot be drafted for (any Pix2Seq model can)."""

    def draft_objects(self, encoder_outputs, config, image_size: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """No drafted objects: one empty `(0, 5)` tensor per image."""
        batch_size = encoder_outputs[0].shape[0]
        return [torch.zeros(0, 5, dtype=torch.long) for _ in range(batch_size)]


class Pix2SeqAuxiliaryDrafter(Pix2SeqLookaheadDrafter):
    """
    Drafts the objects of each image from the model's auxiliary dense head (`draft="auxiliary"`), then goes on as
    [`Pix2SeqLookaheadDrafter`] once they are used up.

    Every feature cell of the head predicts class scores (sigmoid) and the distances from its centre to the four sides
    of a box. The cells whose best class scores at least `score_threshold` are detections; non-maximum suppression
    per class (`iou_threshold`) keeps one per object; they are put in `object_order` and written as
    `ymin xmin ymax xmax class` tokens by the model's box codec.

    Args:
        object_order (`str`, *optional*, defaults to `"dist2ori"`): the order in which the model writes objects: the
            `object_order` of the processor it was trained with (`"dist2ori"`, `"area"` or `"class"`; a model trained
            in `"random"` order gets a draft in `"dist2ori"` order, which it follows only by chance).
        score_threshold (`float`, *optional*, defaults to 0.3): the least class score of a drafted object.
        iou_threshold (`float`, *optional*, defaults to 0.5): boxes of one class overlapping more are one object.
        objects_per_pass (`int`, *optional*): how many objects one verification pass checks at most (a longer
            draft costs a longer pass where it is rejected early); by default [`DEFAULT_OBJECTS_PER_PASS`].
    """

    def __init__(
        self,
        object_order: str = "dist2ori",
        score_threshold: float = 0.3,
        iou_threshold: float = 0.5,
        objects_per_pass: int | None = None,
    ):
        if object_order not in OBJECT_ORDERS:
            raise ValueError(f"Unknown `object_order` {object_order!r} of the draft; choose one of {OBJECT_ORDERS}.")
        for name, value in (("score_threshold", score_threshold), ("iou_threshold", iou_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` of the draft must be a number in [0, 1], got {value!r}.")
        super().__init__(objects_per_pass)
        self.object_order = "dist2ori" if object_order == "random" else object_order
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(object_order={self.object_order!r}, score_threshold={self.score_threshold}, "
            f"iou_threshold={self.iou_threshold}, objects_per_pass={self.objects_per_pass})"
        )

    @staticmethod
    def check_model(model) -> None:
        """Raises `ValueError` when `model` has no auxiliary dense head to draft from."""
        encoder = getattr(getattr(model, "model", None), "encoder", None)
        if getattr(encoder, "auxiliary_head", None) is None:
            raise ValueError(
                "`draft='auxiliary'` drafts from the model's auxiliary dense head, which this model does not have "
                f"(`auxiliary_loss_weight={getattr(model.config, 'auxiliary_loss_weight', None)!r}`; converted "
                "official checkpoints have none). Leave `draft` unset."
            )

    def draft_objects(self, encoder_outputs, config, image_size: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """
        The drafted objects of every image.

        Args:
            encoder_outputs (`Pix2SeqEncoderOutput`): with the head's `auxiliary_logits` `(batch, cells, num_classes)`
                and `auxiliary_distances` `(batch, cells, 4)`.
            config (`Pix2SeqConfig`): the token layout.
            image_size (`tuple[int, int]`, *optional*): pixel height and width of the images (square when not given).

        Returns:
            One `torch.LongTensor` of shape `(num_objects, 5)` per image, on the CPU: the tokens of each drafted
            object, in `object_order`.
        """
        class_logits = getattr(encoder_outputs, "auxiliary_logits", None)
        distances = getattr(encoder_outputs, "auxiliary_distances", None)
        if class_logits is None or distances is None:
            raise ValueError(
                "The encoder outputs carry no `auxiliary_logits` / `auxiliary_distances` to draft from; pass "
                "`pixel_values` to `generate` (not precomputed `encoder_outputs` without them)."
            )
        class_logits, distances = class_logits.detach().float().cpu(), distances.detach().float().cpu()
        all_boxes = cell_boxes(distances, image_size).clamp(0.0, 1.0)
        codec = Pix2SeqBoxCodec(config.token_layout, object_order=self.object_order)
        drafts = []
        for logits, boxes in zip(class_logits, all_boxes):
            scores, labels = logits.sigmoid().max(dim=-1)
            keep = (scores >= self.score_threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            kept = batched_nms(boxes, scores, labels, self.iou_threshold)
            boxes, labels = boxes[kept], labels[kept]
            order = codec._order(boxes, labels, None)
            drafts.append(codec.encode_objects(boxes[order], labels[order]).view(-1, 5))
        return drafts


# The drafters `draft` names.
DRAFTERS = {"auxiliary": Pix2SeqAuxiliaryDrafter, "lookahead": Pix2SeqLookaheadDrafter}


def resolve_drafter(draft) -> Pix2SeqLookaheadDrafter | None:
    """
    The drafter of the `draft` generation option: `None`, a name of `DRAFTERS` (`"auxiliary"`, `"lookahead"`) or a
    drafter ([`Pix2SeqAuxiliaryDrafter`], [`Pix2SeqLookaheadDrafter`]).
    """
    if draft is None or isinstance(draft, Pix2SeqLookaheadDrafter):
        return draft
    if isinstance(draft, str) and draft in DRAFTERS:
        return DRAFTERS[draft]()
    raise ValueError(
        f"`draft` must be None, one of {sorted(DRAFTERS)} or a `Pix2SeqLookaheadDrafter`, got {draft!r}."
    )


class Pix2SeqObjectCandidateGenerator(CandidateGenerator):
    """
    transformers' [`CandidateGenerator`] for one image: proposes the next drafted objects after the tokens written so
    far, corrected by what the model predicted in the last verification pass.

    - Objects the model has completed are matched to the draft (the nearest remaining drafted box, if its coordinates
      are within `match_tolerance` bins): the matched object and the drafted ones before it are used up.
    - A verification pass that rejects a drafted token also gives the model's predictions at the positions after it,
      read with the rejected token in the prefix. A drafted box is a few bins off the model's, and the model's next
      coordinates hardly depend on such a difference, so these predictions start the next draft (as in Jacobi
      decoding); the drafted objects follow them.
    - Inside an object, the draft continues with the remaining tokens of the drafted object nearest to the coordinates
      written so far.
    - Where the drafted objects run out, copies of the last object written fill the draft: they are rarely right
      themselves, but the pass reads the model's predictions after them, which start the next draft.

    The draft never holds more than `objects_per_pass` objects' worth of tokens.

    For sampling (`do_sample`), a prediction is a token drawn from the model's processed distribution at its
    position, and the draft comes with the distribution each token was drawn from ([`draft_tokens`]): that
    distribution for a predicted token, all the mass on the token for a drafted or filler one. Verification then applies
    the speculative-sampling rule ([`accept_sampled_draft`]); a predicted token, drawn from nearly the distribution the
    model has at its position once the rejected token is replaced, is mostly kept.

    Args:
        draft (`torch.LongTensor` of shape `(num_objects, 5)`): the drafted objects' tokens, in writing order.
        prompt_length (`int`): tokens before the first generated one.
        max_length (`int`): the generation's maximum length (prompt included).
        objects_per_pass (`int`): objects proposed per verification at most.
        num_bins (`int`): coordinate bins (the matching tolerance is 5% of them).
        do_sample (`bool`, *optional*, defaults to `False`): the generation samples (predictions are draws, drafts
            come with their distributions) rather than decoding greedily (predictions are each position's argmax).
        vocab_size (`int`, *optional*): the model's vocabulary size; needed for sampling.
    """

    def __init__(
        self,
        draft: torch.LongTensor,
        prompt_length: int,
        max_length: int,
        objects_per_pass: int,
        num_bins: int,
        do_sample: bool = False,
        vocab_size: int | None = None,
    ):
        if do_sample and vocab_size is None:
            raise ValueError("A draft for sampling needs the model's `vocab_size` (the drafts' distributions).")
        self.draft = draft.tolist()
        self.prompt_length = prompt_length
        self.max_length = max_length
        self.objects_per_pass = objects_per_pass
        self.match_tolerance = max(1, round(0.05 * num_bins))
        self.do_sample = do_sample
        self.vocab_size = vocab_size
        self.remaining = list(range(len(self.draft)))
        self.matched_objects = 0
        # The model's predictions after the last pass's first rejected token, and the position of the first of them;
        # for sampling, the distributions they were drawn from (`(len(predicted), vocab_size)`, float64).
        self.predicted: list[int] = []
        self.predicted_probabilities: torch.Tensor | None = None
        self.predicted_from = -1
        self.statistics = _STATISTICS.get()
        if self.statistics is not None:
            self.statistics.sequences += 1
        self._drafted = 0

    def _nearest(self, written: list[int], remaining: list[int]) -> int | None:
        """
        Position in `remaining` of the drafted object whose first coordinates are nearest to the coordinate tokens
        `written` (largest difference in bins), if within the tolerance; else None.
        """
        best, best_distance = None, self.match_tolerance + 1
        for position, index in enumerate(remaining):
            distance = max((abs(a - b) for a, b in zip(written[:4], self.draft[index][:4])), default=0)
            if distance < best_distance:
                best, best_distance = position, distance
        return best

    def _continuation(self, written: list[int], remaining: list[int], budget: int) -> list[int]:
        """Drafted tokens after the tokens `written` (generated, then predicted), from the objects `remaining`."""
        slot = len(written) % 5
        for start in range(5 * self.matched_objects, len(written) - slot, 5):
            position = self._nearest(written[start : start + 4], remaining)
            if position is not None:
                remaining = remaining[position + 1 :]
        proposal = []
        if slot:
            position = self._nearest(written[len(written) - slot :], remaining)
            if position is None:
                return self._filler(written, budget)
            proposal = self.draft[remaining[position]][slot:]
            remaining = remaining[position + 1 :]
        for index in remaining:
            if len(proposal) >= budget:
                break
            proposal = proposal + self.draft[index]
        return (proposal + self._filler(written + proposal, budget - len(proposal)))[:budget]

    @staticmethod
    def _filler(written: list[int], budget: int) -> list[int]:
        """
        Up to `budget` tokens that continue `written` with copies of its last complete object (the rest of the
        current object first): a guess, whose real use is the model's predictions after it, read in the same pass.
        """
        slot = len(written) % 5
        end = len(written) - slot
        if budget <= 0 or end < 5:
            return []
        last = written[end - 5 : end]
        filler = last[slot:]
        while len(filler) < budget:
            filler = filler + last
        return filler[:budget]

    def get_candidates(
        self, input_ids: torch.LongTensor, **kwargs
    ) -> tuple[torch.LongTensor, torch.FloatTensor | None]:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(1, length)`): the prompt and the tokens written so far.

        Returns:
            `(candidate_input_ids, candidate_logits)`: `input_ids` followed by the drafted tokens (none when the draft
            has nothing to offer); for sampling, the log-probabilities each drafted token was drawn from, `(1,
            drafted, vocab_size)` float64 (`-inf` but at the token itself for a drafted object's token), for
            transformers' speculative sampling; `None` for greedy decoding or no draft.
        """
        tokens, drawn_from = self.draft_tokens(input_ids)
        candidate_logits = None if drawn_from is None else drawn_from.log()[None]
        return torch.cat([input_ids, tokens[None]], dim=1), candidate_logits

    def draft_tokens(self, input_ids: torch.LongTensor) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """
        The draft after `input_ids` (`(1, length)`: the prompt and the tokens written so far).

        Returns:
            `(tokens, drawn_from)`: the drafted tokens `(drafted,)` (maybe none), and for sampling the distribution
            each was drawn from, `(drafted, vocab_size)` float64, for [`accept_sampled_draft`] (`None` for greedy
            decoding or no draft).
        """
        generated = input_ids[0, self.prompt_length :].tolist()
        # Drafted objects the model has written (or passed) are used up.
        while self.matched_objects < len(generated) // 5:
            start = 5 * self.matched_objects
            position = self._nearest(generated[start : start + 4], self.remaining)
            if position is not None:
                del self.remaining[: position + 1]
            self.matched_objects += 1
        # The verification feeds `length + len(proposal) - 1` positions and may add one token more.
        budget = min(5 * self.objects_per_pass, max(0, self.max_length - 1 - input_ids.shape[1]))
        predicted = self.predicted if self.predicted_from == input_ids.shape[1] else []
        proposal = predicted[:budget]
        num_predicted = len(proposal)
        proposal = proposal + self._continuation(generated + proposal, self.remaining, budget - len(proposal))
        self._drafted = len(proposal)
        device = input_ids.device
        tokens = torch.tensor(proposal, dtype=input_ids.dtype, device=device)
        if not proposal or not self.do_sample:
            return tokens, None
        drawn_from = torch.zeros(len(proposal), self.vocab_size, dtype=torch.float64, device=device)
        drawn_from[torch.arange(len(proposal), device=device), tokens] = 1.0
        if num_predicted:
            drawn_from[:num_predicted] = self.predicted_probabilities[:num_predicted].to(device)
        return tokens, drawn_from

    def update_candidate_strategy(
        self,
        input_ids: torch.LongTensor,
        scores: torch.Tensor,
        num_matches: int,
        probabilities: torch.Tensor | None = None,
    ):
        """
        Keeps the model's predictions after the first rejected token for the next draft (each position's argmax,
        or for sampling a draw from its distribution, kept with it), and counts the pass.

        Args:
            input_ids (`torch.LongTensor` of shape `(1, length)`): the sequence after this pass.
            scores (`torch.FloatTensor` of shape `(1, drafted + 1, vocab_size)`): the processed logits of the pass.
            num_matches (`int`): drafted tokens accepted.
            probabilities (`torch.Tensor` of shape `(drafted + 1, vocab_size)`, *optional*): for sampling, the
                float64 softmax of `scores[0]` where the caller has it already (else computed here).
        """
        num_matches = int(num_matches)
        after = scores[0, num_matches + 1 :]
        if self.do_sample:
            self.predicted_probabilities = (
                after.double().softmax(dim=-1) if probabilities is None else probabilities[num_matches + 1 :]
            )
            self.predicted = sample_probabilities(self.predicted_probabilities).tolist()
        else:
            self.predicted = after.argmax(dim=-1).tolist()
        self.predicted_from = input_ids.shape[1]
        if self.statistics is not None:
            self.statistics.passes += 1
            self.statistics.drafted_tokens += self._drafted
            self.statistics.accepted_tokens += num_matches
            self.statistics.generated_tokens += num_matches + 1


def candidate_generators(model, generation_config, input_ids, inputs_tensor, model_kwargs):
    """
    One [`Pix2SeqObjectCandidateGenerator`] per image of `input_ids`, drafted with `generation_config.draft` from
    `model_kwargs["encoder_outputs"]`.
    """
    drafter = resolve_drafter(generation_config.draft)
    image_size = tuple(inputs_tensor.shape[-2:]) if inputs_tensor is not None and inputs_tensor.ndim == 4 else None
    drafts = drafter.draft_objects(model_kwargs["encoder_outputs"], model.config, image_size)
    return [
        Pix2SeqObjectCandidateGenerator(
            draft,
            prompt_length=input_ids.shape[1],
            max_length=generation_config.max_length,
            objects_per_pass=drafter.objects_per_pass_for(generation_config.do_sample),
            num_bins=model.config.num_bins,
            do_sample=generation_config.do_sample,
            vocab_size=model.config.vocab_size,
        )
        for draft in drafts
    ]


def candidate_generator(model, generation_config, input_ids, inputs_tensor, model_kwargs):
    """
    The [`Pix2SeqObjectCandidateGenerator`] of the one image of `input_ids` (what
    `Pix2SeqGenerationMixin._get_candidate_generator` returns to transformers' assisted decoding).
    """
    (generator,) = candidate_generators(model, generation_config, input_ids, inputs_tensor, model_kwargs)
    return generator


def check_draft_options(model, generation_config) -> None:
    """Raises `ValueError` for a draft the model or the other generation options cannot honour."""
    generation_config.draft.check_model(model)
    if generation_config.num_beams != 1:
        raise ValueError(
            f"`draft` speculates for greedy decoding and sampling, not beam search (`num_beams="
            f"{generation_config.num_beams}`)."
        )
    if getattr(generation_config, "early_stop_patience", 0):
        raise ValueError(
            "`draft` cannot be combined with `early_stop_patience`: the early stop counts scores token by token, "
            "and a verification pass also scores drafted tokens that are then rejected."
        )


class _TwoArgumentProcessors(LogitsProcessorList):
    """
    A `LogitsProcessorList` of processors that take `(input_ids, scores)` only, called without transformers' check
    of every processor's signature (`inspect.signature`) at every call: the assisted loop calls the list once per
    drafted position, and the check cost 15% of a verification pass of the `tiny` preset.
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


def _without_signature_checks(logits_processor: LogitsProcessorList) -> LogitsProcessorList:
    """`logits_processor` as a `_TwoArgumentProcessors` when every processor takes `(input_ids, scores)` only."""
    if all(Pix2SeqStaticDecoding.accepts_processor(processor) for processor in logits_processor):
        return _TwoArgumentProcessors(logits_processor)
    return logits_processor


# Warpers whose output row depends on that row of scores only (not on the tokens written): a verification pass applies
# them to all its positions at once.
ROW_WISE_WARPERS = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
)


def split_row_wise_processors(logits_processor) -> tuple[list, list]:
    """
    `logits_processor` as `(per_position, row_wise)`: the processors to call once per position (with that position's
    tokens), then the trailing run of row-wise warpers ([`ROW_WISE_WARPERS`], and the official top-p warper), which
    can process every position's scores in one call.
    """
    from .generation_pix2seq import Pix2SeqTopPLogitsWarper  # imports this module

    processors = list(logits_processor)
    start = len(processors)
    while start > 0 and isinstance(processors[start - 1], (*ROW_WISE_WARPERS, Pix2SeqTopPLogitsWarper)):
        start -= 1
    return processors[:start], processors[start:]


def process_positions(
    processors: list, input_ids: torch.LongTensor, scores: torch.FloatTensor, first_length: int
) -> torch.FloatTensor:
    """
    `processors` applied to the logits `scores` (`(rows, vocab_size)`) of consecutive positions of one sequence
    `input_ids` (`(1, length)`), row `i` with the tokens `input_ids[:, :first_length + i]`: in one call per processor
    where all of them have a `process_positions` method (the Pix2Seq grammar), else position by position.

    Returns:
        `torch.FloatTensor` of shape `(rows, vocab_size)`.
    """
    if all(hasattr(processor, "process_positions") for processor in processors):
        for processor in processors:
            scores = processor.process_positions(input_ids, scores, first_length)
        return scores
    rows = []
    for row in range(scores.shape[0]):
        row_scores = scores[row : row + 1]
        for processor in processors:
            row_scores = processor(input_ids[:, : first_length + row], row_scores)
        rows.append(row_scores)
    return torch.cat(rows)


def sample_probabilities(probabilities: torch.Tensor) -> torch.LongTensor:
    """
    One token per row of `probabilities` (`(rows, vocab_size)`, non-negative, each row normalised or not), by inverse
    transform sampling: one uniform number per row, where `torch.multinomial` draws one per token and costs a hundred
    times more on a CPU. Pass float64 rows, so that rounding cannot pick a token of probability zero in practice.

    Returns:
        `torch.LongTensor` of shape `(rows,)`.
    """
    cumulative = probabilities.cumsum(dim=-1)
    uniform = torch.rand(cumulative.shape[0], 1, dtype=cumulative.dtype, device=cumulative.device)
    tokens = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
    return tokens.clamp_(max=cumulative.shape[-1] - 1).view(-1)


def accept_sampled_draft(
    draft: torch.LongTensor, drawn_from: torch.Tensor | None, probabilities: torch.Tensor
) -> tuple[int, int]:
    """
    The speculative-sampling rule (Leviathan et al., 2023, algorithm 1; transformers' `_speculative_sampling`) for
    one sequence: drafted token `i`, drawn from `drawn_from[i]`, is kept with probability `min(1, p_i / q_i)`, `p_i`
    the model's probability of it and `q_i` the draft's, while all before it were kept; at the first rejected token
    the model's token is drawn from `max(p - q, 0)` (normalised), after a fully kept draft from the model's next
    distribution. Each written token then follows the model's distribution, whatever the draft.

    Args:
        draft (`torch.LongTensor` of shape `(drafted,)`): the drafted tokens.
        drawn_from (`torch.Tensor` of shape `(drafted, vocab_size)`): the distribution each was drawn from (all the
            mass on the token for a deterministic draft, which makes the rule "keep it with probability `p_i`");
            `None` for an empty draft.
        probabilities (`torch.Tensor` of shape `(drafted + 1, vocab_size)`): the model's processed distribution at
            each drafted position and after the last one.

    Returns:
        `(accepted, token)`: how many drafted tokens are kept, and the model's token written after them.
    """
    num_drafted = draft.shape[0]
    accepted = 0
    if num_drafted:
        positions = torch.arange(num_drafted, device=draft.device)
        ratio = probabilities[positions, draft] / drawn_from[positions, draft]
        kept = torch.rand(num_drafted, dtype=ratio.dtype, device=ratio.device) <= ratio
        accepted = int(kept.cumprod(dim=0).sum())
    distribution = probabilities[accepted]
    if accepted < num_drafted:
        residual = (distribution - drawn_from[accepted]).clamp_(min=0)
        # Nothing left where the draft's distribution is the model's up to rounding: the model's then.
        if residual.sum() > 0:
            distribution = residual
    return accepted, int(sample_probabilities(distribution[None]))


def stack_steps(per_image: list[list[torch.Tensor]], num_steps: int) -> tuple[torch.Tensor, ...]:
    """
    Per-step scores or logits of images decoded to different lengths, as `_sample` returns them: one
    `(batch_size, vocab_size)` tensor per step, an image's rows zeros after its end.

    Args:
        per_image (`list[list[torch.Tensor]]`): for each image, its `(vocab_size,)` rows in step order (at least one
            image has one).
        num_steps (`int`): the steps of the longest image.
    """
    template = next(rows[0] for rows in per_image if rows)
    return tuple(
        torch.stack([rows[step] if step < len(rows) else torch.zeros_like(template) for rows in per_image])
        for step in range(num_steps)
    )


def verify_drafts(model, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
    """
    Speculative decoding over a static cache, all images of the batch together: each image's draft (from its
    [`Pix2SeqObjectCandidateGenerator`]) is verified by one pass of the model's own decoder over the unverified
    tokens and the drafts of every running image (shorter drafts padded; each token at its own image's position,
    attending to that image's filled cache positions), and an image's cache is cut back past its first rejected token
    by writing its next tokens there. Tokens are chosen as transformers' assisted decoding chooses them (greedy: every
    position's `argmax`, the draft kept up to the first mismatch; sampling: the speculative-sampling rule with the
    draft's distributions, [`accept_sampled_draft`]; cut after an EOS), without its per-pass input preparation, output
    objects and cache copies; processors with a batched form (the Pix2Seq grammar, [`process_positions`]) and the
    row-wise warpers (top-p, ...) process all positions at once. Images that finished are dropped from the decoder
    batch.

    Args:
        model: the model `generate` was called on.
        input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`), logits_processor (processors taking
        `(input_ids, scores)`), stopping_criteria, generation_config: as `generate` prepares them.
        kwargs: the decoding kwargs of `generate` (`encoder_outputs`, `streamer`, `inputs_tensor`, ...).

    Returns:
        What `_sample` returns: a `GenerateEncoderDecoderOutput` (sequences padded with `pad_token_id` after an
        image's end, its scores / raw logits after its end zeros) or the token tensor.
    """
    encoder_outputs = kwargs["encoder_outputs"]
    memory = encoded_images(encoder_outputs)
    batch_size, prompt_length = input_ids.shape
    device = input_ids.device
    streamer = kwargs.get("streamer")
    if streamer is not None and batch_size > 1:
        raise ValueError("`draft` cannot stream a batch: stream one image at a time.")
    generators = candidate_generators(model, generation_config, input_ids, kwargs.get("inputs_tensor"), kwargs)
    max_length = stopping_criteria.max_length or generation_config.max_length
    # One slot past the sequence positions takes the padding of shorter drafts.
    cache = static_cache(model, memory, prompt_length, max_length, extra_positions=1)
    padding_slot = cache.self_attention_cache.layers[0].max_cache_len - 1
    per_position, row_wise = split_row_wise_processors(logits_processor)
    eos_token_ids = set() if generation_config._eos_token_tensor is None else set(
        generation_config._eos_token_tensor.flatten().tolist()
    )
    pad_token_id = generation_config._pad_token_tensor
    return_dict = generation_config.return_dict_in_generate
    keep_scores = return_dict and generation_config.output_scores
    keep_logits = return_dict and generation_config.output_logits

    pad_value = 0 if pad_token_id is None else int(pad_token_id)
    sequences = input_ids.new_full((batch_size, max(max_length, prompt_length)), pad_value)
    sequences[:, :prompt_length] = input_ids
    lengths = [prompt_length] * batch_size
    scores, raw_logits = [[] for _ in range(batch_size)], [[] for _ in range(batch_size)]
    running = list(range(batch_size))  # the images the decoder batch holds, in its order
    while running:
        drafts, draft_tensors, drawn_from = [], [], []
        for row in running:
            row_draft, row_drawn_from = generators[row].draft_tokens(sequences[row : row + 1, : lengths[row]])
            drafts.append(row_draft.tolist())
            draft_tensors.append(row_draft)
            drawn_from.append(row_drawn_from)
            sequences[row, lengths[row] : lengths[row] + len(row_draft)] = row_draft
        drafted = [len(draft) for draft in drafts]
        key_length = max(lengths[row] + count for row, count in zip(running, drafted))
        rows = torch.tensor(running, device=device)
        offsets = torch.arange(max(drafted) + 1, device=device)
        counts = torch.tensor(drafted, device=device)[:, None]
        if lengths[running[0]] == prompt_length:
            # The first pass: the prompts and the drafts, over the empty cache.
            tokens, positions = sequences[rows, : prompt_length + max(drafted)], None
            first = prompt_length - 1
        else:
            positions = torch.tensor([lengths[row] - 1 for row in running], device=device)[:, None] + offsets
            tokens = sequences[rows[:, None], positions.clamp(max=sequences.shape[1] - 1)]
            positions = positions.masked_fill(offsets > counts, padding_slot)
            first = 0
        hidden = model.model.decoder.decode(tokens, memory, cache=cache, key_length=key_length, positions=positions)
        # Each image's positions from its last written token on (the last one repeated past its draft).
        index = first + torch.minimum(offsets, counts)
        hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        # Their positions in the sequences (the first pass starts at 0).
        starts = 0
        if positions is not None:
            starts = torch.tensor([lengths[row] - 1 for row in running], device=device)[:, None]
        logits = model.output_logits(hidden, memory, starts + index, key_length).float()
        processed = torch.cat(
            [
                process_positions(
                    per_position,
                    sequences[row : row + 1, : lengths[row] + count],
                    logits[i, : count + 1],
                    lengths[row],
                )
                for i, (row, count) in enumerate(zip(running, drafted))
            ]
        )
        for processor in row_wise:
            processed = processor(input_ids[:1].expand(processed.shape[0], -1), processed)
        do_sample = generation_config.do_sample
        if do_sample:
            probabilities = processed.double().softmax(dim=-1)
        else:
            chosen = processed.argmax(dim=-1).tolist()

        still_running, start = [], 0
        for i, (row, draft) in enumerate(zip(running, drafts)):
            end = start + len(draft) + 1
            row_processed = processed[start:end]
            if do_sample:
                row_probabilities = probabilities[start:end]
                accepted, token = accept_sampled_draft(draft_tensors[i], drawn_from[i], row_probabilities)
            else:
                # The drafted tokens up to the first that differs from the model's choice, then the model's own.
                row_probabilities, row_chosen, accepted = None, chosen[start:end], 0
                while accepted < len(draft) and row_chosen[accepted] == draft[accepted]:
                    accepted += 1
                token = row_chosen[accepted]
            start = end
            # Cut after an EOS.
            new_tokens = draft[:accepted] + [token]
            ends = [position for position, token in enumerate(new_tokens) if token in eos_token_ids]
            if ends:
                new_tokens = new_tokens[: ends[0] + 1]
            accepted = len(new_tokens) - 1
            sequences[row, lengths[row] : lengths[row] + len(new_tokens)] = torch.tensor(new_tokens, device=device)
            lengths[row] += len(new_tokens)
            written = sequences[row : row + 1, : lengths[row]]
            generators[row].update_candidate_strategy(written, row_processed[None], accepted, row_probabilities)
            if keep_scores:
                scores[row].extend(row_processed[: accepted + 1])
            if keep_logits:
                raw_logits[row].extend(logits[i, : accepted + 1])
            if streamer is not None:
                streamer.put(torch.tensor([new_tokens]))
            if lengths[row] < max_length and not stopping_criteria(written, None).any():
                still_running.append(i)
            else:
                sequences[row, lengths[row] :] = pad_value  # rejected drafted tokens stood there
        if len(still_running) < len(running):
            if still_running:
                keep = torch.tensor(still_running, device=device)
                cache.self_attention_cache.reorder_cache(keep)
                cache.cross_attention_cache.reorder_cache(keep)
                memory = memory.index_select(0, keep)
            running = [running[i] for i in still_running]
    if streamer is not None:
        streamer.end()

    sequences = sequences[:, : max(lengths)]
    if not return_dict:
        return sequences
    num_steps = sequences.shape[1] - prompt_length
    return GenerateEncoderDecoderOutput(
        sequences=sequences,
        scores=stack_steps(scores, num_steps) if keep_scores else None,
        logits=stack_steps(raw_logits, num_steps) if keep_logits else None,
        encoder_attentions=encoder_outputs.get("attentions") if hasattr(encoder_outputs, "get") else None,
        encoder_hidden_states=encoder_outputs.get("hidden_states") if hasattr(encoder_outputs, "get") else None,
    )


def decode_with_draft(
    model, static: bool, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs
):
    """
    Speculative decoding of the batch: [`verify_drafts`] over a static cache (`static`), else transformers' assisted
    decoding (`GenerationMixin._assisted_decoding`, which refuses batches) image after image, its outputs put together
    as `_sample` returns them: sequences padded with `pad_token_id` after an image's end, and its raw logits / scores
    after its end zeros.

    Args:
        model: the model `generate` was called on.
        static (`bool`): verify over a static cache with the model's own decoder, all images together.
        input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`), logits_processor, stopping_criteria,
        generation_config: as `generate` prepares them.
        kwargs: the decoding kwargs of `generate` (`encoder_outputs`, `cache`, `streamer`, `inputs_tensor`, ...).

    Returns:
        What `_sample` returns: a `GenerateEncoderDecoderOutput` or the token tensor.
    """
    if static:
        kwargs.pop("synced_gpus", None)
        return verify_drafts(model, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs)
    logits_processor = _without_signature_checks(logits_processor)
    batch_size = input_ids.shape[0]
    if batch_size == 1:
        return model._assisted_decoding(input_ids, logits_processor, stopping_criteria, generation_config, **kwargs)
    if kwargs.get("streamer") is not None:
        raise ValueError(
            "`draft` with `static_decoding=False` decodes a batch image after image and cannot stream it."
        )
    encoder_outputs = kwargs["encoder_outputs"]
    inputs_tensor = kwargs.get("inputs_tensor")
    results = []
    for row in range(batch_size):
        row_kwargs = dict(kwargs)
        row_outputs = copy.copy(encoder_outputs)
        for key, value in encoder_outputs.items():
            if isinstance(value, torch.Tensor):
                row_outputs[key] = value[row : row + 1]
        row_kwargs["encoder_outputs"] = row_outputs
        if inputs_tensor is not None:
            row_kwargs["inputs_tensor"] = inputs_tensor[row : row + 1]
        cache = kwargs.get("cache")
        if cache is not None:
            row_kwargs["cache"] = type(cache)(
                type(cache.self_attention_cache)(config=model.config),
                type(cache.cross_attention_cache)(config=model.config),
            )
        results.append(
            model._assisted_decoding(
                input_ids[row : row + 1], logits_processor, stopping_criteria, generation_config, **row_kwargs
            )
        )
    return_dict = not isinstance(results[0], torch.Tensor)
    rows = [result.sequences if return_dict else result for result in results]
    length = max(row.shape[1] for row in rows)
    pad_token_id = generation_config._pad_token_tensor
    sequences = torch.cat(
        [torch.nn.functional.pad(row, (0, length - row.shape[1]), value=int(pad_token_id)) for row in rows]
    )
    if not return_dict:
        return sequences

    def per_step(name):
        if getattr(results[0], name) is None:
            return None
        rows = [[step[0] for step in getattr(result, name)] for result in results]
        return stack_steps(rows, length - input_ids.shape[1])

    return type(results[0])(
        sequences=sequences,
        scores=per_step("scores"),
        logits=per_step("logits"),
        encoder_attentions=encoder_outputs.get("attentions"),
        encoder_hidden_states=encoder_outputs.get("hidden_states"),
    )


__all__ = [
    "DRAFTERS",
    "DraftStatistics",
    "Pix2SeqAuxiliaryDrafter",
    "Pix2SeqLookaheadDrafter",
    "Pix2SeqObjectCandidateGenerator",
    "acceptance_statistics",
]
