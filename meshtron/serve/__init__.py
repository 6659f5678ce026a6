"""`meshtron serve`: an OpenAI-compatible completions server over the mesh (HTTP and scheduling on rank 0, every
rank decoding in lockstep). protocol: the API as data; app: the HTTP routes; scheduler: batching and the
control messages; server: starting the ranks and shutting them down."""
from meshtron.serve.server import ServeOptions, launch, serve_rank

__all__ = ["ServeOptions", "launch", "serve_rank"]
