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
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PackedLinear", "can_pack", "pack_linears"]


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


def pack_linears(model: nn.Module) -> int:
    """Replace the model's plain ``nn.Linear`` layers by ``PackedLinear`` (see the module
    docstring); returns how many were replaced."""
    if not can_pack(model):
        return 0
    # A weight held by two modules (a head tied to the embeddings) must stay a parameter.
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16
    ]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child, shared=owners[id(child.weight)] > 1))
    return len(swaps)
