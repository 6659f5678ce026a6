"""Megatron's parallel layers over explicit mesh axes; every parameter carries its `ShardSpec`."""
from meshtron.parallel.attention import ParallelAttention
from meshtron.parallel.cross_entropy import vocab_parallel_cross_entropy
from meshtron.parallel.embedding import VocabParallelEmbedding
from meshtron.parallel.linear import ColumnParallelLinear, RowParallelLinear
from meshtron.parallel.mlp import ParallelMLP
from meshtron.parallel.norms import LayerNorm, RMSNorm
from meshtron.parallel.random import DropoutRNG
from meshtron.parallel.rotary import Rotary
from meshtron.parallel.sharding import ShardSpec, full_state_dict, init_parameters, load_full_state_dict

__all__ = ["ParallelAttention", "vocab_parallel_cross_entropy", "VocabParallelEmbedding",
           "ColumnParallelLinear", "RowParallelLinear", "ParallelMLP", "LayerNorm", "RMSNorm", "DropoutRNG",
           "Rotary", "ShardSpec", "full_state_dict", "init_parameters", "load_full_state_dict"]
