"""cps_hf: Cross Pseudo Supervision for semi-supervised semantic segmentation, Hugging Face native."""

from transformers import AutoConfig, AutoModelForSemanticSegmentation

from .configuration_cps import CPSConfig
from .image_processing import create_image_processor
from .modeling_cps import CPSForSemanticSegmentation, CPSPreTrainedModel, CPSSemanticSegmenterOutput

AutoConfig.register(CPSConfig.model_type, CPSConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(CPSConfig, CPSForSemanticSegmentation, exist_ok=True)
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
