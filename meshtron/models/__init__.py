"""The model families (GPT-2, Llama) and their configs; `build_model` picks the class by `config.family`."""
from meshtron.models.config import PRESETS, ModelConfig, get_preset
from meshtron.models.gpt import GPT
from meshtron.models.llama import Llama


def build_model(config: ModelConfig, mesh, rules=None, seed: int = 0, virtual_stages: int = 1):
    """This rank's part of the model on `mesh` (all of it without a `pipe` axis)."""
    return (GPT if config.family == "gpt" else Llama)(config, mesh, rules, seed, virtual_stages)


__all__ = ["ModelConfig", "PRESETS", "get_preset", "GPT", "Llama", "build_model"]
