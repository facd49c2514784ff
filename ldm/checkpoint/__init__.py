"""Read .safetensors/.ckpt files and diffusers folders (`read`), detect the model variant (`detect`), load strictly
(`load`). The names below are the package's public API."""

from ldm.checkpoint.detect import detect_variant
from ldm.checkpoint.load import load_model, split_state_dict
from ldm.checkpoint.read import (
    CONFIG_KEY,
    KNOWN_EXTRAS,
    PREFIXES,
    CheckpointError,
    LazyStateDict,
    config_from_tensor,
    config_to_tensor,
    read_state_dict,
)

__all__ = [
    "CONFIG_KEY",
    "KNOWN_EXTRAS",
    "PREFIXES",
    "CheckpointError",
    "LazyStateDict",
    "config_from_tensor",
    "config_to_tensor",
    "detect_variant",
    "load_model",
    "read_state_dict",
    "split_state_dict",
]
