"""Pix2Seq model configuration."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .box_codec import Pix2SeqTokenLayout


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
            Name of a timm model (`use_timm_backbone=True`, the default) used when `backbone_config` is not given.
            Defaults to `"resnet50"`.
        use_timm_backbone (`bool`, *optional*, init only, defaults to `True`):
            Whether `backbone` names a timm model.
        backbone_kwargs (`dict`, *optional*, init only):
            Extra fields of the backbone config built from `backbone` (e.g. `{"out_indices": [3]}` or
            `{"output_stride": 16}` for a C4 feature map).
        use_pretrained_backbone (`bool`, *optional*, defaults to `False`):
            Load ImageNet weights for a timm backbone when the model is built from this config (needs the Hub).
        backbone_model_kwargs (`dict`, *optional*):
            Keyword arguments given to `timm.create_model`, e.g. `{"dynamic_img_size": True}` for ViT backbones.
        num_channels (`int`, *optional*, defaults to 3):
            Number of input image channels.

    Encoder and decoder:
        encoder_hidden_size / decoder_hidden_size (`int`, *optional*, defaults to 256):
            Width of the encoder and of the decoder.
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

    Tokens (DESIGN.md section 3):
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

    Training losses beyond the paper (both off by default, the paper's recipe; see docs/training.md):
        coordinate_label_sigma (`float`, *optional*, defaults to 0.0):
            Soft targets for coordinate tokens: a Gaussian of this standard deviation (in bins) around the target bin,
            over the coordinate bins, replaces the one-hot target, so that a neighbouring bin earns partial credit.
            0 keeps the one-hot cross-entropy.
        auxiliary_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of an auxiliary dense loss on the encoder output during training: every feature cell predicts the
            class of the object whose centre falls in it (or background) and that object's box (L1 + GIoU). Its head
            is built only when the weight is positive and is never used for detection. 0: no head, no loss.

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
    layer_norm_eps: float = 1e-6
    init_std: float = 0.02
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

    def __post_init__(self, **kwargs):
        if self.backbone_config is None:
            backbone = kwargs.pop("backbone", None) or "resnet50"
            use_timm_backbone = kwargs.pop("use_timm_backbone", True)
            backbone_kwargs = dict(kwargs.pop("backbone_kwargs", None) or {})
            if use_timm_backbone:
                self.backbone_config = {
                    "model_type": "timm_backbone",
                    "backbone": backbone,
                    "num_channels": self.num_channels,
                    "features_only": True,
                    "out_indices": [-1],
                    **backbone_kwargs,
                }
            else:
                backbone_config = AutoConfig.from_pretrained(backbone, **backbone_kwargs)
                self.backbone_config = backbone_config
        else:
            for name in ("backbone", "use_timm_backbone", "backbone_kwargs"):
                if kwargs.get(name) is not None:
                    raise ValueError(f"Pass either `backbone_config` or `{name}`, not both.")
                kwargs.pop(name, None)

        id2label = self.id2label
        if self.num_classes is None:
            self.num_classes = len(id2label) if id2label else 80
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

    @property
    def token_layout(self) -> Pix2SeqTokenLayout:
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
        if self.max_position_embeddings < 5 * self.max_objects + 1:
            raise ValueError(
                f"`max_position_embeddings={self.max_position_embeddings}` cannot hold the prompt and "
                f"`5 * max_objects = {5 * self.max_objects}` tokens; raise it to at least {5 * self.max_objects + 1}."
            )
        if not 0 <= self.eos_token_weight:
            raise ValueError(f"`eos_token_weight` must be non-negative, got {self.eos_token_weight}.")
        if not 0 <= self.coordinate_label_sigma:
            raise ValueError(f"`coordinate_label_sigma` must be non-negative, got {self.coordinate_label_sigma}.")
        if not 0 <= self.auxiliary_loss_weight:
            raise ValueError(f"`auxiliary_loss_weight` must be non-negative, got {self.auxiliary_loss_weight}.")

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


__all__ = ["Pix2SeqConfig"]
