"""anymoe.models: the MoE decoder, its presets, checkpoint IO (anymoe and Hugging Face), upcycling,
ONNX export and generation. Heavy parts (transformers, onnx) load only when used."""

from anymoe.models.config import MLAConfig, ModelConfig
from anymoe.models.io import from_pretrained, save_pretrained
from anymoe.models.presets import PRESETS, preset, preset_data
from anymoe.models.transformer import ModelOutput, MoETransformer

__all__ = [
    "MLAConfig",
    "ModelConfig",
    "ModelOutput",
    "MoETransformer",
    "PRESETS",
    "from_pretrained",
    "preset",
    "preset_data",
    "save_pretrained",
]
