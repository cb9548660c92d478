"""Linear weights packed once for the CPU's bfloat16 GEMM (oneDNN), not on every call.

Contract: ``pack_linears(model)`` replaces every plain ``nn.Linear`` of a bfloat16 model on a
CPU whose oneDNN has bfloat16 kernels by a ``PackedLinear`` holding its weight in oneDNN's
blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing does for
compiled CPU models), and returns how many it replaced (0 where it does not apply: float32,
a GPU, no oneDNN bfloat16). Outputs equal ``F.linear``'s bit for bit: the same oneDNN kernel
runs, minus the reorder. Why: a bfloat16 ``F.linear`` on a CPU re-lays its weight out on every
call, about 25-30 us per call whatever the rows (measured on the embedded model's shapes, 2
threads), and a forward makes 7 such calls per layer plus the head: about 6 ms of a 60 ms
one-token forward. Only models this package loaded itself are packed (a caller's own model is
left as it is). The dense weight is not kept (no extra memory), except where another module
shares it (a head tied to the embeddings keeps its dense copy there): ``PackedLinear.weight``
is then a meta tensor with the right shape and dtype, for code that reads them.

Sibling layers that the model feeds the same input (an attention's ``q_proj``/``k_proj``/
``v_proj``, an MLP's ``gate_proj``/``up_proj``) are packed as ONE GEMM (``FusedLinear``): each
becomes a ``LinearPart`` that returns its slice of the fused output, computed once per input
(the first sibling called with a tensor computes it; the others take their slices). Why: fewer,
wider GEMMs; 7 calls per layer become 4, about 4 ms of a 48 ms forward at 24 rows of the
embedded model. The fused outputs equal the separate ones bit for bit (each output element is
the same dot product; tested on the 7 architectures). No extra memory: the fused weight is the
only copy.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

__all__ = ["FusedLinear", "LinearPart", "PackedLinear", "can_pack", "pack_linears"]

# Sibling layers fed the same input in every stock transformers model that has them.
_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def can_pack(model: nn.Module) -> bool:
    """Whether ``pack_linears`` applies: a bfloat16 model on a CPU with oneDNN bf16 kernels."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or param.dtype != torch.bfloat16:
        return False
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without these ops
        return False


class PackedLinear(nn.Linear):
    """``nn.Linear`` (inference only) over a weight packed for oneDNN's bfloat16 GEMM; a
    subclass, so code that looks for Linear layers finds it.

    Args:
        linear: the layer to replace (bfloat16, on the CPU).
        shared: whether another module holds the same weight (then it stays a parameter here
            too: no copy is freed, and ``weight`` is that parameter).
    """

    def __init__(self, linear: nn.Linear, *, shared: bool = False) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a fresh weight
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with torch.no_grad():
            # The row-count hint only picks the blocking; any number of rows runs (and a
            # one-row hint was as fast as a matching one at 1-64 rows here).
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = linear.bias
        if shared:
            self.weight = linear.weight
        else:
            # Shape and dtype for code that reads them; no storage (the packed copy is it).
            self.register_buffer(
                "weight",
                torch.empty(linear.weight.shape, dtype=linear.weight.dtype, device="meta"),
                persistent=False,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features] -> [..., out_features]``, as ``F.linear(x, W, b)``."""
        if x.dtype != torch.bfloat16 or x.device.type != "cpu":
            # The model was cast or moved after loading: the packed weight cannot follow.
            msg = (
                f"this Linear layer's weight was packed for bfloat16 on the CPU when the model "
                f"was loaded, and got {x.dtype} on {x.device}: load the model with "
                "load_model_and_tokenizer(..., pack=False) to change its dtype or device later"
            )
            raise RuntimeError(msg)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        """As ``nn.Linear`` prints itself, plus the layout."""
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


class FusedLinear(PackedLinear):
    """Sibling Linear layers (same input size, all with or all without bias) packed as one:
    ``forward(x)`` returns their outputs side by side; ``part(x, i)`` sibling i's slice.

    Args:
        linears: the siblings, in order (bfloat16, on the CPU).
    """

    def __init__(self, linears: list[nn.Linear]) -> None:
        joined = nn.Linear(
            linears[0].in_features,
            sum(lin.out_features for lin in linears),
            bias=linears[0].bias is not None,
            device="meta",
        )
        with torch.no_grad():
            joined.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]))
            if joined.bias is not None:
                joined.bias = nn.Parameter(torch.cat([lin.bias for lin in linears]))
        super().__init__(joined)
        self.sizes = [lin.out_features for lin in linears]
        # Per thread: the last input, its parts and how many siblings have not taken theirs.
        self._memo = threading.local()

    def __getstate__(self) -> dict:
        """Copies and pickles leave the per-thread memo behind (a fresh one is made)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else dict(self.__dict__)
        return {k: v for k, v in state.items() if k != "_memo"}

    def __setstate__(self, state: dict) -> None:
        """See ``__getstate__``."""
        super().__setstate__(state)
        self._memo = threading.local()

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Sibling ``index``'s output for ``x`` (``[..., out_i]``, a view of the fused one)."""
        memo = self._memo
        if getattr(memo, "x", None) is not x:
            memo.x, memo.parts, memo.left = (
                x,
                self(x).split_with_sizes(self.sizes, -1),
                len(self.sizes),
            )
        out = memo.parts[index]
        memo.left -= 1
        if memo.left <= 0:  # every sibling has its slice: hold no tensors between forwards
            memo.x = memo.parts = None
        return out


class LinearPart(nn.Module):
    """Stands in for one fused sibling: its slice of a ``FusedLinear``'s output, with the
    sibling's ``in_features``/``out_features`` and a meta ``weight`` of its shape for readers.

    Args:
        fused: the fused layer.
        index: this sibling's place in it.
        linear: the layer it replaces (for its sizes and dtype).
    """

    def __init__(self, fused: FusedLinear, index: int, linear: nn.Linear) -> None:
        super().__init__()
        self.fused = fused
        self.index = index
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        meta = torch.empty(linear.weight.shape, dtype=linear.weight.dtype, device="meta")
        self.register_buffer("weight", meta, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features] -> [..., out_features]``, from the fused layer."""
        return self.fused.part(x, self.index)


def _fuse_siblings(model: nn.Module, owners: dict[int, int]) -> int:
    """Replace each group of `_SIBLINGS` by ``LinearPart`` views of one ``FusedLinear``."""
    fused = 0
    for parent in list(model.modules()):
        for names in _SIBLINGS:
            layers = [getattr(parent, n, None) for n in names]
            if not all(
                type(lin) is nn.Linear
                and lin.weight.dtype == torch.bfloat16
                and owners[id(lin.weight)] == 1
                and lin.in_features == layers[0].in_features
                and (lin.bias is None) == (layers[0].bias is None)
                for lin in layers
            ):
                continue
            joined = FusedLinear(layers)
            parent.add_module("_fused_" + names[0].split("_")[0], joined)
            for i, (name, lin) in enumerate(zip(names, layers, strict=True)):
                setattr(parent, name, LinearPart(joined, i, lin))
            fused += len(layers)
    return fused


def pack_linears(model: nn.Module) -> int:
    """Replace the model's plain ``nn.Linear`` layers by ``PackedLinear``, fused siblings by
    ``LinearPart`` views of one ``FusedLinear`` (see the module docstring); returns how many
    layers were replaced."""
    if not can_pack(model):
        return 0
    # A weight held by two modules (a head tied to the embeddings) must stay a parameter.
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    fused = _fuse_siblings(model, owners)
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16
    ]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child, shared=owners[id(child.weight)] > 1))
    return fused + len(swaps)
