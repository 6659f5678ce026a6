"""Interoperability with other formats: Hugging Face GPT-2 and Llama folders in (sharded on load) and out."""
from meshtron.interop.hf import (build_from_hf, config_to_hf, export_hf, is_hf_dir, load_hf_into, read_hf,
                                 read_hf_config, to_hf_state, tokenizer_files)
from meshtron.models.hf_config import HFConfigError, config_from_hf, load_hf_config

__all__ = ["build_from_hf", "config_to_hf", "export_hf", "is_hf_dir", "load_hf_into", "read_hf", "read_hf_config",
           "to_hf_state", "tokenizer_files", "HFConfigError", "config_from_hf", "load_hf_config"]
