"""Generation: tensor-parallel decoding with a KV cache, sampling, penalties, logprobs, stop sequences, continuous
batching."""
from meshtron.inference.engine import Completion, Engine, Event, Request, generate, model_eos_ids
from meshtron.inference.kv_cache import KVCache
from meshtron.inference.replicas import PromptLogprobs
from meshtron.inference.sampling import SamplingParams
from meshtron.inference.text import TextStream
from meshtron.inference.window import sample_ids

__all__ = ["Completion", "Engine", "Event", "PromptLogprobs", "Request", "generate", "model_eos_ids", "KVCache",
           "SamplingParams", "TextStream", "sample_ids"]
