"""Communication: the counted, error-naming collectives and Megatron's conjugate autograd operators."""
from meshtron.comm.collectives import CommCounter, CollectiveError
from meshtron.comm.ops import gather_from_parallel, reduce_from_parallel

__all__ = ["CommCounter", "CollectiveError", "reduce_from_parallel", "gather_from_parallel"]
