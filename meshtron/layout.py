"""Layout rules: Mesh-TensorFlow's map from named tensor dimensions to mesh axes, validated up front.

Invariant: a `Layout` (rules checked against one mesh and one model shape) only exists if every tensor
of the model can be split as the rules say: each dimension on at most one axis, no tensor with two
dimensions on one axis, every split dimension divisible (the vocabulary is padded instead), every mesh
axis used. All of this is checked before any collective runs; each error says what to change.
"""
from __future__ import annotations

from dataclasses import dataclass

from meshtron.mesh import Mesh, MeshAxis, parse_pairs

# Logical dimensions meshtron knows, and which of them its layers can split.
DIMENSIONS = {
    "batch": "sequences in a batch (data parallelism)",
    "vocab": "vocabulary (embedding rows, output logits)",
    "heads": "attention (query) heads",
    "kv_heads": "key/value heads (grouped-query attention); always split like heads",
    "d_ff": "MLP hidden units",
    "d_model": "model width (residual stream)",
    "seq": "sequence positions of the residual stream (sequence parallelism)",
    "head_dim": "width of one attention head",
    "layers": "transformer layers (pipeline parallelism: contiguous stages)",
}
SPLITTABLE = ("batch", "vocab", "heads", "kv_heads", "d_ff", "seq", "layers")

# The named shape of every tensor the models build (parameters and activations). Two dimensions of one
# tensor may never map to the same mesh axis. `seq` names the sequence dimension only where it can be split
# (the residual stream, under sequence parallelism); attention, the MLP's hidden units and the logits always
# see the whole sequence (Megatron's all-gather on entry), so their sequence dimension is not listed.
TENSORS = {
    "tokens": ("batch", "seq"),
    "residual": ("batch", "seq", "d_model"),
    "embedding.weight": ("vocab", "d_model"),
    "attention.q": ("batch", "heads", "head_dim"),
    "attention.kv": ("batch", "kv_heads", "head_dim"),
    "attention.q_proj.weight": ("heads", "head_dim", "d_model"),
    "attention.kv_proj.weight": ("kv_heads", "head_dim", "d_model"),
    "attention.o_proj.weight": ("d_model", "heads", "head_dim"),
    "mlp.hidden": ("batch", "d_ff"),
    "mlp.up.weight": ("d_ff", "d_model"),
    "mlp.down.weight": ("d_model", "d_ff"),
    "logits": ("batch", "vocab"),
}

DEFAULT_RULES = "batch:batch;heads:model;kv_heads:model;d_ff:model;vocab:model;layers:pipe"


class LayoutError(ValueError):
    """An illegal layout; the message names the dimension, the axis, the sizes and what to change."""


@dataclass(frozen=True)
class LayoutRules:
    """Parsed rules `dim:axis;...`; not yet checked against a mesh (see `Layout`)."""
    rules: tuple[tuple[str, str], ...]
    explicit: bool = True

    @classmethod
    def parse(cls, text: str) -> "LayoutRules":
        seen: dict[str, str] = {}
        for dim, axis in parse_pairs(text, "layout rules"):
            if dim in seen:
                raise LayoutError(
                    f"layout rules {text!r}: dimension {dim!r} is mapped to two mesh axes ({seen[dim]!r} and "
                    f"{axis!r}); a tensor dimension maps to at most one axis: keep one of the two rules")
            if dim not in DIMENSIONS:
                raise LayoutError(f"layout rules {text!r}: unknown dimension {dim!r}; known dimensions: "
                                  + ", ".join(DIMENSIONS))
            seen[dim] = axis
        return cls(tuple(seen.items()))

    @classmethod
    def default_for(cls, mesh_shape: dict[str, int]) -> "LayoutRules":
        """Mesh-TensorFlow's transformer defaults, keeping only the rules whose axis the mesh has."""
        rules = cls.parse(DEFAULT_RULES).rules
        return cls(tuple((d, a) for d, a in rules if a in mesh_shape), explicit=False)

    def as_dict(self) -> dict[str, str]:
        return dict(self.rules)

    def __str__(self) -> str:
        return ";".join(f"{d}:{a}" for d, a in self.rules)


def pad_to_multiple(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class Layout:
    """Rules checked against a mesh and model sizes; hands each layer the `MeshAxis` it splits over."""
    mesh: Mesh
    rules: LayoutRules
    dims: dict[str, str]

    @classmethod
    def build(cls, mesh: Mesh, rules: LayoutRules | str | None, sizes: dict[str, int]) -> "Layout":
        """Validate. `sizes` gives the model's dimension sizes, e.g. {'heads': 12, 'd_ff': 3072, ...}."""
        if rules is None:
            rules = LayoutRules.default_for(mesh.shape)
        elif isinstance(rules, str):
            rules = LayoutRules.parse(rules)
        validate(rules, mesh.shape, sizes)
        dims = rules.as_dict()
        if "heads" in dims and "kv_heads" not in dims:
            dims["kv_heads"] = dims["heads"]
        return cls(mesh, rules, dims)

    def axis_name(self, dim: str) -> str | None:
        return self.dims.get(dim)

    def axis(self, dim: str) -> MeshAxis:
        """The mesh axis `dim` is split over (a trivial size-1 axis when it is replicated)."""
        return self.mesh.axis(self.dims.get(dim))


def validate(rules: LayoutRules, mesh_shape: dict[str, int], sizes: dict[str, int]) -> None:
    """Every check of the module docstring; raises LayoutError naming dimension, axis, sizes and the fix."""
    dims = rules.as_dict()
    mesh_txt = ",".join(f"{k}:{v}" for k, v in mesh_shape.items())
    for dim, axis in dims.items():
        if axis not in mesh_shape:
            raise LayoutError(f"layout rule '{dim}:{axis}': the mesh {mesh_txt!r} has no axis {axis!r}; "
                              f"use one of {list(mesh_shape)} or add '{axis}:N' to the mesh")
        if dim not in SPLITTABLE:
            raise LayoutError(f"layout rule '{dim}:{axis}': meshtron cannot split {dim!r} "
                              f"({DIMENSIONS[dim]}); splittable dimensions: {', '.join(SPLITTABLE)}")
    if "kv_heads" in dims and dims.get("heads") != dims["kv_heads"]:
        raise LayoutError(f"layout rules {str(rules)!r}: kv_heads is on {dims['kv_heads']!r} but heads on "
                          f"{dims.get('heads')!r}; split kv_heads over the same axis as heads")
    if "heads" in dims:
        dims.setdefault("kv_heads", dims["heads"])
    if "seq" in dims:
        axis = dims["seq"]
        for needed in ("heads", "d_ff"):
            if dims.get(needed) != axis:
                raise LayoutError(
                    f"layout rule 'seq:{axis}': sequence parallelism splits the residual stream over the axis "
                    f"that splits attention heads and the MLP (Megatron), but {needed!r} is on "
                    f"{dims.get(needed)!r}: add '{needed}:{axis}' or drop 'seq:{axis}'")
        if dims.get("vocab") not in (None, axis):
            raise LayoutError(f"layout rule 'seq:{axis}' with 'vocab:{dims['vocab']}': with sequence parallelism "
                              f"the vocabulary is split over the sequence's axis or not at all: use 'vocab:{axis}' "
                              f"or drop the vocab rule")
    if "layers" in dims:
        axis = dims["layers"]
        others = [d for d, a in dims.items() if a == axis and d != "layers"]
        if others:
            raise LayoutError(f"layout rules {str(rules)!r}: mesh axis {axis!r} splits the layers into pipeline "
                              f"stages and cannot also split {others}: give those another axis")
        if list(mesh_shape)[0] != axis:
            raise LayoutError(f"the pipeline axis {axis!r} must be the first (outermost) mesh axis, as Megatron "
                              f"orders ranks (pipe, then batch, then model): write the mesh as "
                              f"'{axis}:{mesh_shape[axis]},' followed by the other axes")
    for tensor, names in TENSORS.items():
        used: dict[str, str] = {}
        for name in names:
            axis = dims.get(name)
            if axis is None:
                continue
            if axis in used:
                raise LayoutError(
                    f"layout rules {str(rules)!r}: tensor {tensor} {list(names)} would have both "
                    f"{used[axis]!r} and {name!r} on mesh axis {axis!r}; two dimensions of one tensor may not "
                    f"share an axis: map one of them to another axis")
            used[axis] = name
    for dim in ("batch", "heads", "kv_heads", "d_ff", "seq", "layers"):
        axis = dims.get(dim)
        if axis is None or dim not in sizes:
            continue
        n, size = sizes[dim], mesh_shape[axis]
        if n % size:
            fits = [d for d in range(1, n + 1) if n % d == 0]
            raise LayoutError(
                f"{dim}={n} is not divisible by mesh axis {axis!r} of size {size}: choose a '{axis}' size that "
                f"divides {n} (one of {fits}) or a model whose {dim} is a multiple of {size}")
    for axis, size in mesh_shape.items():
        if size > 1 and axis not in dims.values():
            raise LayoutError(
                f"mesh axis {axis!r} (size {size}) is used by no layout rule, so its ranks would repeat the same "
                f"work: map a dimension to it (e.g. 'batch:{axis}' or 'heads:{axis}') or drop it from the mesh")
