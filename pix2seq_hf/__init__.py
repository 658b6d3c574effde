"""Pix2Seq object detection (Chen et al., ICLR 2022) as a Hugging Face Transformers model.

Importing this package registers the Pix2Seq classes with the transformers `Auto*` factories, so that
`AutoModelForObjectDetection.from_pretrained(...)` and `pipeline("object-detection", model=...)` find them.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForObjectDetection,
    AutoProcessor,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES

from .box_codec import Pix2SeqBoxCodec, Pix2SeqTokenLayout
from .configuration_pix2seq import Pix2SeqConfig
from .generation_pix2seq import (
    PIX2SEQ_GENERATION_DEFAULTS,
    Pix2SeqGenerationMixin,
    Pix2SeqLogitsProcessor,
    Pix2SeqTopPLogitsWarper,
)
from .image_processing_pix2seq import Pix2SeqImageProcessor
from .modeling_pix2seq import (
    Pix2SeqForObjectDetection,
    Pix2SeqGenerateBeamOutput,
    Pix2SeqGenerateOutput,
    Pix2SeqModel,
    Pix2SeqObjectDetectionOutput,
    Pix2SeqPreTrainedModel,
)
from .processing_pix2seq import Pix2SeqProcessor


__version__ = "0.1.0"

AutoConfig.register("pix2seq", Pix2SeqConfig, exist_ok=True)
AutoModel.register(Pix2SeqConfig, Pix2SeqModel, exist_ok=True)
AutoModelForObjectDetection.register(Pix2SeqConfig, Pix2SeqForObjectDetection, exist_ok=True)
AutoImageProcessor.register(Pix2SeqConfig, image_processor_classes={"torchvision": Pix2SeqImageProcessor}, exist_ok=True)
AutoProcessor.register(Pix2SeqConfig, Pix2SeqProcessor, exist_ok=True)
# The object-detection pipeline checks the model class against this name table (registered classes are not in it)
# and logs an error for any other class, although it runs them fine.
MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES.setdefault("pix2seq", "Pix2SeqForObjectDetection")

__all__ = [
    "PIX2SEQ_GENERATION_DEFAULTS",
    "Pix2SeqBoxCodec",
    "Pix2SeqConfig",
    "Pix2SeqForObjectDetection",
    "Pix2SeqGenerateBeamOutput",
    "Pix2SeqGenerateOutput",
    "Pix2SeqGenerationMixin",
    "Pix2SeqImageProcessor",
    "Pix2SeqLogitsProcessor",
    "Pix2SeqModel",
    "Pix2SeqObjectDetectionOutput",
    "Pix2SeqPreTrainedModel",
    "Pix2SeqProcessor",
    "Pix2SeqTokenLayout",
    "Pix2SeqTopPLogitsWarper",
]
