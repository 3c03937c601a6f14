"""cps_hf: Cross Pseudo Supervision for semi-supervised semantic segmentation, Hugging Face native."""

from transformers import AutoConfig, AutoModelForSemanticSegmentation
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES

from .configuration_cps import CPSConfig
from .image_processing import create_image_processor
from .modeling_cps import CPSForSemanticSegmentation, CPSPreTrainedModel, CPSSemanticSegmenterOutput

AutoConfig.register(CPSConfig.model_type, CPSConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(CPSConfig, CPSForSemanticSegmentation, exist_ok=True)
# The image-segmentation pipeline checks the model's class name against copies of transformers' name tables, which
# drop the registration above; without this entry it logs a false "not supported" error. Model types absent from
# the config name table (such as "cps") are never imported through this table, so the Auto classes are unaffected.
MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault(
    CPSConfig.model_type, CPSForSemanticSegmentation.__name__
)
# Saved folders carry configuration/modeling code so they load with `trust_remote_code=True` without cps_hf.
CPSConfig.register_for_auto_class()
CPSForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

__version__ = "0.1.0"

__all__ = [
    "CPSConfig",
    "CPSForSemanticSegmentation",
    "CPSPreTrainedModel",
    "CPSSemanticSegmenterOutput",
    "create_image_processor",
]
