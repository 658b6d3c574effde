"""Pix2Seq model configuration."""

from dataclasses import asdict, dataclass, fields

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.utils import logging
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.configuration_utils import SubConfigSpec



TOKENS_PER_OBJECT = 5
"""Tokens an object takes in a Pix2Seq sequence: `ymin xmin ymax xmax class`."""

DEFAULT_NUM_CLASSES = 80
"""Classes of a config given neither `num_classes` nor `id2label` (COCO's 80)."""


logger = logging.get_logger(__name__)

# Training options that were measured not to help and are no longer part of the model (see
# examples/benchmarks/RESULTS.md): a saved config that still has them loads without them, with a warning when one was on.
REMOVED_OPTIONS = ("auxiliary_hints", "cross_attention_loss_weight")

def _as_list(value):
    """Tuples as lists, so that `(3,)` and `[3]` (a config after a JSON round trip) compare equal."""
    return list(value) if isinstance(value, tuple) else value


@strict
class Pix2SeqConfig(PreTrainedConfig):
    r"""
    Configuration of a [`Pix2SeqForObjectDetection`] model: a vision backbone, a Transformer encoder over its feature
    map, and a causal Transformer decoder that writes objects as `ymin xmin ymax xmax class` tokens.

    The defaults are the paper's ResNet-50 model (Chen et al., ICLR 2022) and the token layout of the official release:
    pad/EOS 0, detection prompt 10, noise class 30, classes from 100, coordinate bins from 1000, vocabulary 3000.

    Backbone (as `DetrConfig` accepts it):
        backbone_config (`PreTrainedConfig` or `dict`, *optional*):
            Configuration of the backbone: a `TimmBackboneConfig` or any transformers backbone config (`ResNetConfig`,
            ...). Built from `backbone` when not given.
        backbone (`str`, *optional*, init only):
            Name of a timm model (`use_timm_backbone=True`, the default; defaults to `"resnet50"`) or of a transformers
            checkpoint (`use_timm_backbone=False`; without it, transformers' ResNet-50 layout) used when
            `backbone_config` is not given.
        use_timm_backbone (`bool`, *optional*, init only, defaults to `True`):
            Whether `backbone` names a timm model. With `backbone_config` given, `backbone`, `use_timm_backbone` and
            `backbone_kwargs` may repeat what it says (as `DetrConfig` allows); only a contradiction raises.
        backbone_kwargs (`dict`, *optional*, init only):
            Extra fields of the backbone config built from `backbone` (e.g. `{"out_indices": [3]}` or
            `{"output_stride": 16}` for a C4 feature map).
        use_pretrained_backbone (`bool`, *optional*, defaults to `False`):
            Load ImageNet weights for a timm backbone when the model is built from this config (needs the Hub).
        backbone_model_kwargs (`dict`, *optional*):
            Keyword arguments given to `timm.create_model`, e.g. `{"dynamic_img_size": True}` for ViT backbones.
        num_channels (`int`, *optional*, defaults to 3):
            Number of input image channels.
        stem_pool_padding (`str`, *optional*, defaults to `"symmetric"`):
            Padding of the stem max-pool of a timm ResNet backbone: `"symmetric"` (timm's) or `"same"` (TensorFlow's
            `'SAME'`, which pads only bottom/right on even sizes; what the official Pix2Seq ResNets were trained with,
            set by the checkpoint converter).
        encoder_stem (`str`, *optional*, defaults to `"backbone"`):
            What turns pixels into the encoder's tokens: `"backbone"` (the backbone's last feature map, then a linear
            projection to `encoder_hidden_size`) or `"patch"` (the official Pix2Seq ViT: a `patch_size` convolution
            with bias straight to `encoder_hidden_size`; no backbone, no class token, fixed 2D sine-cosine positions,
            so the `encoder_layers` pre-LN layers are the ViT).
        patch_size (`int`, *optional*, defaults to 16):
            Patch size of the `"patch"` stem.

    Encoder and decoder:
        encoder_hidden_size / decoder_hidden_size (`int`, *optional*, defaults to 256):
            Width of the encoder and of the decoder.
        d_model / hidden_size (`int`, *optional*, init only):
            DETR's name for the model width: sets `decoder_hidden_size`, and `encoder_hidden_size` too unless that is
            given with another value. As attributes, `config.d_model` and `config.hidden_size` are the decoder width.
        encoder_layers / decoder_layers (`int`, *optional*, defaults to 6):
            Number of layers (`encoder_layers=0` uses the backbone features directly, as with a ViT backbone).
        encoder_ffn_dim / decoder_ffn_dim (`int`, *optional*, defaults to 1024):
            Width of the feed-forward blocks.
        encoder_attention_heads / decoder_attention_heads (`int`, *optional*, defaults to 8):
            Number of attention heads.
        activation_function (`str`, *optional*, defaults to `"gelu"`):
            Activation of the feed-forward blocks.
        dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the feed-forward hidden units (the official `drop_units`), embeddings and the backbone
            projection.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities.
        drop_path_rate (`float`, *optional*, defaults to 0.1):
            Stochastic depth rate, constant over layers (as the official code).
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of every LayerNorm.
        init_std (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated-normal weight initialisation.
        max_position_embeddings (`int`, *optional*, defaults to 512):
            Learned decoder positions; must cover `5 * max_objects + 1` tokens.

    Tokens (the vocabulary layout: see docs/concepts.md):
        num_bins (`int`, *optional*, defaults to 1000):
            Quantisation bins per coordinate (at least 2).
        num_classes (`int`, *optional*):
            Number of object classes. Derived from `id2label` when not given; 80 when neither is given.
        vocab_size (`int`, *optional*, defaults to 3000):
            Vocabulary size; checked to hold every token range.
        bos_token_id (`int`, *optional*, defaults to 10):
            The detection prompt, first token of every decoder input (also `decoder_start_token_id`).
        pad_token_id / eos_token_id (`int`, *optional*, defaults to 0):
            Padding and end of sequence (one token).
        noise_token_id (`int`, *optional*, defaults to 30):
            Class token of the noise objects of sequence augmentation.
        class_token_offset (`int`, *optional*, defaults to 100):
            Token of class `i` is `class_token_offset + i`.
        coord_token_offset (`int`, *optional*, defaults to 1000):
            Token of bin `b` is `coord_token_offset + b`.
        max_objects (`int`, *optional*, defaults to 100):
            Objects per training sequence and most objects detected per image.
        eos_token_weight (`float`, *optional*, defaults to 0.1):
            Loss weight of end-of-sequence/padding targets.

    Training options beyond the paper (all off by default, the paper's recipe; see docs/training.md):
        coordinate_label_sigma (`float`, *optional*, defaults to 0.0):
            Soft targets for coordinate tokens: a Gaussian of this standard deviation (in bins) around the target bin,
            over the coordinate bins, replaces the one-hot target, so that a neighbouring bin earns partial credit.
            0 keeps the one-hot cross-entropy.
        auxiliary_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of an auxiliary dense loss on the encoder output during training (one-to-many, as FCOS): the
            feature cells near an object's centre and inside its box predict its class and the distances to its sides
            (focal + GIoU loss), the others background. Its head is built only when the weight is positive; detection
            does not use it (unless `auxiliary_copy`). 0: no head, no loss.
        auxiliary_copy (`bool`, *optional*, defaults to `False`):
            Coordinate and class tokens partly copied from the auxiliary head (needs `auxiliary_loss_weight > 0`): at
            each position the decoder points at memory cells and mixes its next-token distribution with the pointed
            cells' box coordinates or class probabilities (see `auxiliary_copy.Pix2SeqAuxiliaryCopy`). Training and
            detection both use it.
        coordinate_embedding_init (`str`, *optional*, defaults to `"normal"`):
            How the embeddings of the coordinate tokens (tied to the output projection) start: `"normal"` like every
            other token, or `"sincos"`, the 1D sine-cosine code of the bin's position (the encoder's position code of
            pixel `(b, b)`, at the same scale), so that neighbouring bins start alike. Only random initialisation
            reads it.

    Example:

    ```python
    >>> from pix2seq_hf import Pix2SeqConfig, Pix2SeqForObjectDetection

    >>> config = Pix2SeqConfig(backbone="resnet50", id2label={0: "cat", 1: "dog"})
    >>> model = Pix2SeqForObjectDetection(config)
    ```
    """

    model_type = "pix2seq"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="timm_backbone",
            init_kwargs={"backbone": "resnet50", "out_indices": [-1]},
        ),
    }
    attribute_map = {
        "hidden_size": "decoder_hidden_size",
        "d_model": "decoder_hidden_size",
        "num_attention_heads": "decoder_attention_heads",
        "num_hidden_layers": "decoder_layers",
    }

    backbone_config: dict | PreTrainedConfig | None = None
    use_pretrained_backbone: bool = False
    backbone_model_kwargs: dict | None = None
    num_channels: int = 3
    stem_pool_padding: str = "symmetric"
    encoder_stem: str = "backbone"
    patch_size: int = 16

    encoder_hidden_size: int = 256
    encoder_layers: int = 6
    encoder_ffn_dim: int = 1024
    encoder_attention_heads: int = 8
    decoder_hidden_size: int = 256
    decoder_layers: int = 6
    decoder_ffn_dim: int = 1024
    decoder_attention_heads: int = 8
    activation_function: str = "gelu"
    dropout: float | int = 0.1
    attention_dropout: float | int = 0.0
    drop_path_rate: float | int = 0.1
    layer_norm_eps: float | int = 1e-6
    init_std: float | int = 0.02
    max_position_embeddings: int = 512
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = True
    use_cache: bool = True

    num_bins: int = 1000
    num_classes: int | None = None
    vocab_size: int = 3000
    bos_token_id: int = 10
    decoder_start_token_id: int = 10
    pad_token_id: int = 0
    eos_token_id: int = 0
    noise_token_id: int = 30
    class_token_offset: int = 100
    coord_token_offset: int = 1000
    max_objects: int = 100
    eos_token_weight: float | int = 0.1
    coordinate_label_sigma: float | int = 0.0
    auxiliary_loss_weight: float | int = 0.0
    coordinate_embedding_init: str = "normal"
    auxiliary_copy: bool = False

    def __post_init__(self, **kwargs):
        for name in REMOVED_OPTIONS:
            value = kwargs.pop(name, None)
            if value:
                logger.warning(
                    f"`{name}` is no longer a Pix2Seq training option (measured not to help); this config's "
                    f"`{name}={value!r}` is ignored, and weights that only it used are not loaded."
                )
        if self.encoder_stem not in ("backbone", "patch"):
            raise ValueError(f'`encoder_stem` must be "backbone" or "patch", got {self.encoder_stem!r}.')
        if self.stem_pool_padding not in ("symmetric", "same"):
            raise ValueError(f'`stem_pool_padding` must be "symmetric" or "same", got {self.stem_pool_padding!r}.')
        if isinstance(self.patch_size, bool) or not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise ValueError(f"`patch_size` must be a positive int, got {self.patch_size!r}.")
        self._resolve_backbone_config(
            kwargs.pop("backbone", None), kwargs.pop("use_timm_backbone", None), kwargs.pop("backbone_kwargs", None)
        )
        self._resolve_model_width(kwargs)

        id2label = self.id2label
        if self.num_classes is None:
            self.num_classes = len(id2label) if id2label else DEFAULT_NUM_CLASSES
        if id2label is None:
            kwargs.setdefault("num_labels", self.num_classes)
        elif len(id2label) != self.num_classes:
            raise ValueError(
                f"`num_classes={self.num_classes}` disagrees with `id2label`, which names {len(id2label)} classes."
            )
        super().__post_init__(**kwargs)
        # Checked here rather than in `validate_*` class validators so that users get a plain `ValueError`.
        self._check_architecture()
        self._check_token_layout()

    def _resolve_backbone_config(self, backbone, use_timm_backbone, backbone_kwargs) -> None:
        """
        Builds `backbone_config` from the init-only DETR-style arguments, or checks them against a given one.

        Every consistent combination that `DetrConfig` accepts is accepted: `backbone` names a timm model
        (`use_timm_backbone=True`, the default) or a transformers checkpoint (`use_timm_backbone=False`; without
        `backbone`, transformers' ResNet-50 layout); with `backbone_config` given, the other arguments may repeat what
        it says. Only contradictions raise (`ValueError`).
        """
        backbone_kwargs = dict(backbone_kwargs or {})
        if self.backbone_config is not None:
            self._check_backbone_arguments(backbone, use_timm_backbone, backbone_kwargs)
            return
        if use_timm_backbone is None or use_timm_backbone:
            self.backbone_config = {
                "model_type": "timm_backbone",
                "backbone": backbone or "resnet50",
                "num_channels": self.num_channels,
                "features_only": True,
                "out_indices": [-1],
                **backbone_kwargs,
            }
        elif backbone is not None:
            self.backbone_config = AutoConfig.from_pretrained(backbone, **backbone_kwargs)
        else:
            # DETR's default transformers backbone: ResNet-50 (transformers' `ResNetConfig` defaults), last stage.
            self.backbone_config = CONFIG_MAPPING["resnet"](**{"out_features": ["stage4"], **backbone_kwargs})

    def _check_backbone_arguments(self, backbone, use_timm_backbone, backbone_kwargs: dict) -> None:
        """Raises `ValueError` when `backbone`, `use_timm_backbone` or `backbone_kwargs` contradict `backbone_config`."""
        given = self.backbone_config
        fields = given if isinstance(given, dict) else given.to_dict()
        model_type = fields.get("model_type")
        is_timm = model_type == "timm_backbone"
        if use_timm_backbone is not None and bool(use_timm_backbone) != is_timm:
            raise ValueError(
                f"`use_timm_backbone={use_timm_backbone}` contradicts `backbone_config`, a `{model_type}` config; "
                f"drop `use_timm_backbone` or pass `use_timm_backbone={is_timm}`."
            )
        if backbone is not None:
            named = fields.get("backbone") if is_timm else fields.get("_name_or_path") or getattr(given, "name_or_path", "")
            if backbone != named:
                raise ValueError(
                    f"`backbone={backbone!r}` contradicts `backbone_config`, which describes "
                    f"{named!r}; pass only one of them."
                )
        for name, value in backbone_kwargs.items():
            if name not in fields or _as_list(fields[name]) != _as_list(value):
                raise ValueError(
                    f"`backbone_kwargs[{name!r}]={value!r}` contradicts `backbone_config` (which has "
                    f"{name}={fields.get(name, '<unset>')!r}); set it in `backbone_config` instead."
                )

    def _resolve_model_width(self, kwargs: dict) -> None:
        """
        `d_model` / `hidden_size` at init (DETR's name for the model width) set the decoder width and, unless
        `encoder_hidden_size` is given with another value, the encoder width too. As attributes afterwards they
        read and write `decoder_hidden_size`.
        """
        widths = {kwargs.pop(name) for name in ("d_model", "hidden_size") if kwargs.get(name) is not None}
        if len(widths) > 1:
            raise ValueError(f"`d_model` and `hidden_size` name the same width but disagree: {sorted(widths)}.")
        if not widths:
            return
        (width,) = widths
        self.decoder_hidden_size = width
        if self.encoder_hidden_size == type(self).encoder_hidden_size:
            self.encoder_hidden_size = width

    @property
    def _attn_implementation(self):
        return self._attn_implementation_internal

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | dict | None):
        # `PreTrainedConfig` hands an implementation asked for by name (`from_pretrained(attn_implementation=...)`) to
        # every sub-config. The backbone computes features with its own layers (timm's attention, or none in a
        # ResNet): it gets the implementation when its class supports it, and keeps its own otherwise.
        PreTrainedConfig._attn_implementation.fset(self, self.attn_implementation_request(value))

    def attn_implementation_request(self, value: str | dict | None) -> str | dict | None:
        """
        `value` (an attention implementation for the whole model) as transformers' per-sub-config request: unchanged,
        or `{"": value}` (the backbone keeps its implementation) when the backbone's class does not support `value`
        (timm backbones declare no flex attention).
        """
        backbone_config = getattr(self, "backbone_config", None)
        if not isinstance(value, str) or not isinstance(backbone_config, PreTrainedConfig):
            return value
        from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING

        backbone_class = MODEL_FOR_BACKBONE_MAPPING.get(type(backbone_config), None)
        support_flag = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}.get(value)
        if backbone_class is None or support_flag is None or getattr(backbone_class, support_flag, False):
            return value
        return {"": value}

    @property
    def token_layout(self) -> "Pix2SeqTokenLayout":
        """The token layout (`Pix2SeqTokenLayout`) of this model's vocabulary."""
        return Pix2SeqTokenLayout.from_config(self)

    def _check_token_layout(self):
        """Raises `ValueError` when token ranges do not fit the vocabulary or overlap."""
        self.token_layout.validate()
        if self.decoder_start_token_id != self.bos_token_id:
            raise ValueError(
                f"`decoder_start_token_id` ({self.decoder_start_token_id}) must equal `bos_token_id` "
                f"({self.bos_token_id}): the detection prompt starts every sequence."
            )
        length = self.token_layout.max_sequence_length
        if self.max_position_embeddings < length + 1:
            raise ValueError(
                f"`max_position_embeddings={self.max_position_embeddings}` cannot hold the prompt and "
                f"`5 * max_objects = {length}` tokens; raise it to at least {length + 1}."
            )
        if not 0 <= self.eos_token_weight:
            raise ValueError(f"`eos_token_weight` must be non-negative, got {self.eos_token_weight}.")
        if not 0 <= self.coordinate_label_sigma:
            raise ValueError(f"`coordinate_label_sigma` must be non-negative, got {self.coordinate_label_sigma}.")
        if not 0 <= self.auxiliary_loss_weight:
            raise ValueError(f"`auxiliary_loss_weight` must be non-negative, got {self.auxiliary_loss_weight}.")
        if self.auxiliary_copy and not self.auxiliary_loss_weight > 0:
            raise ValueError(
                "`auxiliary_copy=True` copies the auxiliary dense head's predictions: it needs "
                f"`auxiliary_loss_weight > 0`, got {self.auxiliary_loss_weight}."
            )
        if self.coordinate_embedding_init not in ("normal", "sincos"):
            raise ValueError(
                f'`coordinate_embedding_init` must be "normal" or "sincos", got {self.coordinate_embedding_init!r}.'
            )

    def _check_architecture(self):
        """Raises `ValueError` when widths do not split evenly over the attention heads."""
        for part in ("encoder", "decoder"):
            hidden = getattr(self, f"{part}_hidden_size")
            heads = getattr(self, f"{part}_attention_heads")
            if hidden % heads != 0:
                raise ValueError(f"`{part}_hidden_size={hidden}` is not a multiple of `{part}_attention_heads={heads}`.")
            if hidden % 4 != 0:
                raise ValueError(
                    f"`{part}_hidden_size={hidden}` must be a multiple of 4 (sin and cos of two axes share the width "
                    "of the 2D position embedding)."
                )
        if self.encoder_layers < 0 or self.decoder_layers < 1:
            raise ValueError(
                f"Need `encoder_layers >= 0` and `decoder_layers >= 1`, got {self.encoder_layers} and "
                f"{self.decoder_layers}."
            )


@dataclass(frozen=True)
class Pix2SeqTokenLayout:
    """
    Where each kind of token lives in the Pix2Seq vocabulary (see docs/concepts.md): the token fields of
    [`Pix2SeqConfig`], whose defaults are this layout's (`Pix2SeqConfig().token_layout == Pix2SeqTokenLayout()`).

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

    num_bins: int = Pix2SeqConfig.num_bins
    num_classes: int = DEFAULT_NUM_CLASSES
    vocab_size: int = Pix2SeqConfig.vocab_size
    pad_token_id: int = Pix2SeqConfig.pad_token_id
    eos_token_id: int = Pix2SeqConfig.eos_token_id
    bos_token_id: int = Pix2SeqConfig.bos_token_id
    noise_token_id: int = Pix2SeqConfig.noise_token_id
    class_token_offset: int = Pix2SeqConfig.class_token_offset
    coord_token_offset: int = Pix2SeqConfig.coord_token_offset
    max_objects: int = Pix2SeqConfig.max_objects

    @classmethod
    def from_config(cls, config) -> "Pix2SeqTokenLayout":
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
        """`TOKENS_PER_OBJECT`: `ymin xmin ymax xmax class`."""
        return TOKENS_PER_OBJECT

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

    def check_compatible(self, other: "Pix2SeqTokenLayout", what: str = "model config") -> None:
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


__all__ = ["DEFAULT_NUM_CLASSES", "TOKENS_PER_OBJECT", "Pix2SeqConfig", "Pix2SeqTokenLayout"]
