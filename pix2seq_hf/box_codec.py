"""Token layout of Pix2Seq sequences and the box codec that turns boxes into tokens and back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Pix2SeqTokenLayout:
    """
    Where each kind of token lives in the Pix2Seq vocabulary (DESIGN.md section 3).

    Args:
        num_bins (`int`): number of quantisation bins per coordinate.
        num_classes (`int`): number of real object classes (labels `0..num_classes-1`).
        vocab_size (`int`): size of the vocabulary; every range below must fit inside it.
        pad_token_id (`int`): padding token, also used as end-of-sequence (as in the official code).
        eos_token_id (`int`): end-of-sequence token.
        bos_token_id (`int`): detection prompt, the first token of every decoder input.
        noise_token_id (`int`): class token of the fake ("noise") objects of sequence augmentation.
        class_token_offset (`int`): token of label `i` is `class_token_offset + i`.
        coord_token_offset (`int`): token of bin `b` is `coord_token_offset + b`.
        max_objects (`int`): objects per training sequence; a sequence holds `5 * max_objects` tokens.
    """

    num_bins: int = 1000
    num_classes: int = 80
    vocab_size: int = 3000
    pad_token_id: int = 0
    eos_token_id: int = 0
    bos_token_id: int = 10
    noise_token_id: int = 30
    class_token_offset: int = 100
    coord_token_offset: int = 1000
    max_objects: int = 100

    @classmethod
    def from_config(cls, config) -> Pix2SeqTokenLayout:
        """Reads the layout fields off a `Pix2SeqConfig` (or any object with the same attributes)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def class_token_end(self) -> int:
        """One past the last class token."""
        return self.class_token_offset + self.num_classes

    @property
    def coord_token_end(self) -> int:
        """One past the last coordinate token."""
        return self.coord_token_offset + self.num_bins

    @property
    def tokens_per_object(self) -> int:
        return 5

    @property
    def max_sequence_length(self) -> int:
        """Tokens in a full target sequence: `5 * max_objects` (EOS included only when there is room)."""
        return self.tokens_per_object * self.max_objects

    def validate(self) -> None:
        """Raises `ValueError` naming the offending field when the layout is inconsistent."""
        if self.num_bins < 2:
            raise ValueError(f"`num_bins` must be at least 2 to quantise a coordinate, got {self.num_bins}.")
        if self.num_classes < 1:
            raise ValueError(f"`num_classes` must be at least 1, got {self.num_classes}.")
        if self.max_objects < 1:
            raise ValueError(f"`max_objects` must be at least 1, got {self.max_objects}.")
        if self.pad_token_id != self.eos_token_id:
            raise ValueError(
                f"`pad_token_id` ({self.pad_token_id}) and `eos_token_id` ({self.eos_token_id}) must be the same "
                "token: Pix2Seq pads with end-of-sequence."
            )
        ranges = {
            "pad/eos token": (self.pad_token_id, self.pad_token_id + 1),
            "bos token": (self.bos_token_id, self.bos_token_id + 1),
            "noise token": (self.noise_token_id, self.noise_token_id + 1),
            "class tokens": (self.class_token_offset, self.class_token_end),
            "coordinate tokens": (self.coord_token_offset, self.coord_token_end),
        }
        for name, (start, end) in ranges.items():
            if start < 0:
                raise ValueError(f"The {name} start at {start}; token ids must be non-negative.")
            if end > self.vocab_size:
                raise ValueError(
                    f"The {name} occupy ids {start}..{end - 1}, which does not fit in `vocab_size={self.vocab_size}`"
                    f" (num_classes={self.num_classes}, num_bins={self.num_bins}); raise `vocab_size` or move the range."
                )
        items = sorted(ranges.items(), key=lambda item: item[1])
        for (name_a, (start_a, end_a)), (name_b, (start_b, end_b)) in zip(items, items[1:]):
            if start_b < end_a:
                raise ValueError(
                    f"Token ranges overlap: {name_a} use ids {start_a}..{end_a - 1} and {name_b} use ids "
                    f"{start_b}..{end_b - 1}. Check `class_token_offset`, `coord_token_offset`, `noise_token_id`, "
                    f"`bos_token_id`, `num_classes` and `num_bins`."
                )

    def check_compatible(self, other: Pix2SeqTokenLayout, what: str = "model config") -> None:
        """
        Raises `ValueError` listing every field on which `other` (e.g. a model's layout) disagrees with this one
        (e.g. a processor's layout): sequences written with one cannot be read with the other.
        """
        mismatches = [
            f"{f.name}: {getattr(self, f.name)} here vs {getattr(other, f.name)} in the {what}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        if mismatches:
            raise ValueError(
                "The Pix2Seq token layout of the processor does not match the "
                f"{what}: " + "; ".join(mismatches) + ". Build the processor with `Pix2SeqProcessor.from_pretrained` "
                "of the same checkpoint, or with the model's config."
            )
