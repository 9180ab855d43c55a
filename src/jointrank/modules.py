"""Low-rank layers that replace nn.Linear, installing them into a model and merging them back.

A joint group's members share one input basis, stored once. The state-dict names these modules produce are the
checkpoint format's (format.py documents them); `install_unit` is the one place that builds the structure, used
when compressing and when transformers rebuilds a saved checkpoint, so the two cannot disagree.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn as nn

from .format import basis_name


class SharedBasis(nn.Module):
    """The input basis B (k, d_in) of a joint group, registered once on the members' parent module (a cross-layer
    group's: on its first layer's; members of the later layers borrow it, each projecting its own input).

    Members of a group are called one after another on the *same* input tensor (q_proj(h), k_proj(h)), so the
    projection x Bᵀ is computed by the first caller and handed to the others: a joint group then costs
    k·d_in multiply-adds once per token instead of once per member. The cache is keyed on the identity of the
    input tensor (held weakly), its version counter and the basis weight's version, so a different or modified
    input, or a reloaded basis, is never served stale.

    Under torch.inference_mode tensors carry no version counter; the projection is then still shared, keyed on
    identity alone. That is safe for model code that can be trained: a Linear saves its input for the weight
    gradient, so code modifying q_proj's input in place before calling k_proj on it would already fail under
    autograd. Not sharing there would cost one extra k·d_in matmul per group and token (measured in
    bench/inference_speed.py). `shared_projection(False)` turns sharing off, for tests and measurements.
    """

    enabled = True  # class-wide switch, see shared_projection()

    def __init__(self, rank: int, in_features: int, num_members: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.num_members = num_members
        self._cache: tuple | None = None  # (weakref to input, version, projection, uses left)

    def quantize_as(self, quantized: nn.Module) -> None:
        """Hold the basis as a quantize.QuantizedWeight (stored as `<basis>.quantized.*`) instead of `weight`."""
        del self.weight
        self.quantized = quantized
        self._cache = None

    def _weight(self) -> torch.Tensor:
        quantized = self._modules.get("quantized")
        return quantized.tensor() if quantized is not None else self.weight

    def _stored(self) -> torch.Tensor:
        quantized = self._modules.get("quantized")
        return quantized.qdata if quantized is not None else self.weight

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if not SharedBasis.enabled or self.num_members < 2:
            self._cache = None
            return nn.functional.linear(x, self._weight())
        cache = self._cache
        key = (_version(x), _version(self._stored()))
        if cache is not None and cache[0]() is x and cache[1] == key:
            ref, _, projected, uses_left = cache
            self._cache = (ref, key, projected, uses_left - 1) if uses_left > 1 else None
            return projected
        projected = nn.functional.linear(x, self._weight())
        self._cache = (weakref.ref(x), key, projected, self.num_members - 1)
        return projected

    def extra_repr(self) -> str:
        if "quantized" in self._modules:
            return f"shared_by={self.num_members}"
        return f"rank={self.weight.shape[0]}, in_features={self.weight.shape[1]}, shared_by={self.num_members}"


def _version(x: torch.Tensor) -> int | None:
    try:
        return x._version
    except RuntimeError:  # an inference tensor has no version counter: identity alone (see SharedBasis)
        return None


@contextlib.contextmanager
def shared_projection(enabled: bool):
    """Turn sharing of joint projections on or off inside a block (every member then projects for itself)."""
    previous, SharedBasis.enabled = SharedBasis.enabled, enabled
    try:
        yield
    finally:
        SharedBasis.enabled = previous


class LowRankLinear(nn.Module):
    """y = (x Bᵀ) Aᵀ + b: a drop-in for nn.Linear holding only the factors.

    A separate layer owns its basis (registered as `basis`); a joint member borrows its group's SharedBasis
    without registering it, so the basis appears once in parameters(), state_dict() and on disk.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 shared_basis: SharedBasis | None = None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        if shared_basis is None:
            self.basis = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        else:
            object.__setattr__(self, "_shared", shared_basis)  # deliberately not a submodule: stored once
        self.out = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def shared_basis(self) -> SharedBasis | None:
        return self.__dict__.get("_shared")

    @property
    def bias(self) -> torch.Tensor | None:
        return self.out.bias

    @property
    def basis_weight(self) -> torch.Tensor:
        shared = self.shared_basis
        return shared.weight if shared is not None else self.basis.weight

    def _apply(self, fn, recurse=True):  # .to(dtype or device), .float(), ...: keep the layout right for the result
        module = super()._apply(fn, recurse)
        self.relayout_()
        return module

    @torch.no_grad()
    def relayout_(self) -> None:
        """Store the output factor A (d_out, k) column-major on a CPU in float32 and bfloat16, row-major otherwise.

        Same values, same shape, same state-dict bytes (saving makes tensors contiguous); only the memory order
        changes, and with it the kernel a one-token matmul takes. Decoding one token at a time on a CPU, a tall
        factor read column-major ran faster: Qwen2.5-Coder-1.5B at 20% decoded 1.41x dense in float32 against 1.21x
        with them row-major (medians of repeats), and 1.141x against 1.118x in bfloat16 (paired step by step with
        dense; results/inference_speed_qwen2.5-coder-1.5b.md; 1.145x in the next run). In bfloat16 the gain is not
        confirmed: both layouts paired step by step with dense in one run read 1.106x column-major against 1.096x
        row-major, prefill 1.19x both (results/inference_speed_qwen2.5-coder-1.5b_bf16_20.md), a tie; the
        repeats' noisier decode reading favoured row-major there and in the run before. float16 is left row-major:
        not measured.
        """
        weight = self.out._parameters.get("weight")
        if weight is None or weight.dim() != 2 or min(weight.shape) < 2:
            return
        column = (weight.device.type == "cpu" and weight.dtype in LowRankLinear.column_major_dtypes
                  and LowRankLinear.column_major)
        if column != (weight.stride() == (1, weight.shape[0])):
            weight.data = weight.data.t().contiguous().t() if column else weight.data.contiguous()

    column_major = True  # class-wide switch for the layout above (benchmarks compare both)
    column_major_dtypes = (torch.float32, torch.bfloat16)  # the dtypes it applies to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_basis
        hidden = shared.project(x) if shared is not None else self.basis(x)
        return self.out(hidden)

    def dense_weight(self) -> torch.Tensor:
        """A B: the (d_out, d_in) matrix this layer computes, for merging back into an nn.Linear."""
        return (self.out.weight.float() @ self.basis_weight.float()).to(self.out.weight.dtype)

    def extra_repr(self) -> str:
        kind = "joint" if self.shared_basis is not None else "separate"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, {kind}"


def install_unit(model: nn.Module, members: tuple[str, ...] | list[str], rank: int, *, shared: bool,
                 group: str) -> None:
    """Swap the members' nn.Linear for LowRankLinear of the given rank (weights uninitialised).

    Used both when compressing and when transformers rebuilds a saved checkpoint on the meta device, so the two
    paths cannot disagree on module structure or state-dict names.
    """
    originals = [model.get_submodule(name) for name in members]
    ref = originals[0].weight
    factory = {"device": ref.device, "dtype": ref.dtype}
    basis = None
    if shared:
        # registered on the first member's parent; a cross-layer unit's members in later layers borrow it. The
        # projection is shared between the members that read one input: those of one parent (one layer)
        parents = [name.rsplit(".", 1)[0] for name in members]
        basis = SharedBasis(rank, originals[0].in_features, parents.count(parents[0]), **factory)
        model.get_submodule(parents[0]).add_module(basis_name(parents[0], group).rsplit(".", 1)[1], basis)
    for name, old in zip(members, originals):
        parent_name, attr = name.rsplit(".", 1)
        new = LowRankLinear(old.in_features, old.out_features, rank, old.bias is not None, shared_basis=basis,
                            **factory)
        new.relayout_()  # factors copied in later keep this layout (copy_ writes in place)
        setattr(model.get_submodule(parent_name), attr, new)


def relayout_(model: nn.Module) -> None:
    """Every low-rank layer's output factor in the layout its device and dtype decode fastest with (see
    LowRankLinear.relayout_); for weights that arrived by assignment rather than copy (transformers' loading)."""
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            module.relayout_()


@torch.no_grad()
def merge_(model: nn.Module) -> int:
    """Write every low-rank layer back into a dense nn.Linear of the original shape; returns how many."""
    if any(hasattr(m, "qdata") for m in model.modules()):
        from .errors import JointRankError

        raise JointRankError("a model with quantised weights cannot be merged back to dense: merge first, then "
                             "quantise")
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=module.out.weight.device, dtype=module.out.weight.dtype)
            dense.weight.copy_(module.dense_weight())
            if module.bias is not None:
                dense.bias.copy_(module.bias)
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, dense)
            merged += 1
    for name, module in list(model.named_modules()):
        if isinstance(module, SharedBasis):
            parent, attr = name.rsplit(".", 1)
            delattr(model.get_submodule(parent), attr)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.is_quantized = False
    return merged
