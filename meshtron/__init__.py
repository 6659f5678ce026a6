"""meshtron: hybrid data x model parallel transformers on a named device mesh (Megatron layers, Mesh-TF layouts)."""
from meshtron.mesh import Mesh, MeshAxis
from meshtron.layout import Layout, LayoutRules, LayoutError
from meshtron import models

__all__ = ["Mesh", "MeshAxis", "Layout", "LayoutRules", "LayoutError", "models"]
__version__ = "0.1.0"
