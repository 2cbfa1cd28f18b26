"""Agreement: every implementation returns the reference's integers and refusals.

An *implementation* here is any callable with the numpy reference's signature,
``impl(weight, num_replicas, num_groups, num_nodes, num_gpus)``, taking a
numpy ``weight`` ``[L, E]`` and returning ``(phy2log, log2phy, logcnt)`` as
anything ``numpy.asarray`` converts. The adapters below give the project's
implementations that shape: the JAX reference and the torch production path,
with its numpy core and with its compiled core, four with the numpy reference
(the JAX and torch ones convert the input, check that the outputs are int64
arrays of their own kind, on the right device, and bring them back to numpy).
They import JAX and torch only when called.

``first_difference`` finds the first slot where two placements differ;
``check_agreement`` and ``check_refusal`` raise ``AssertionError`` naming the
implementation and the difference.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "OUTPUT_NAMES",
    "Difference",
    "Implementation",
    "Placement",
    "check_agreement",
    "check_refusal",
    "compiled_production",
    "first_difference",
    "jax_reference",
    "load_callable",
    "numpy_reference",
    "project_implementations",
    "torch_production",
]

#: Names of the three outputs, in return order.
OUTPUT_NAMES = ("phy2log", "log2phy", "logcnt")

#: (phy2log [L, R], log2phy [L, E, K], logcnt [L, E]), int64.
Placement = tuple[np.ndarray, np.ndarray, np.ndarray]
#: impl(weight [L, E], num_replicas, num_groups, num_nodes, num_gpus) -> placement.
Implementation = Callable[..., object]

# What each index of each output means, for messages.
_AXES = {
    "phy2log": ("layer", "slot"),
    "log2phy": ("layer", "expert", "replica"),
    "logcnt": ("layer", "expert"),
}


@dataclass(frozen=True)
class Difference:
    """Where two placements first differ.

    output: "phy2log", "log2phy" or "logcnt", or "result" when the candidate
        did not return three arrays.
    index: the first differing entry (row-major), or None for a shape or
        dtype difference.
    """

    output: str
    index: tuple[int, ...] | None
    expected: object
    got: object

    def __str__(self) -> str:
        if self.index is None:
            return f"{self.output}: expected {self.expected}, got {self.got}"
        where = ", ".join(
            f"{axis} {i}" for axis, i in zip(_AXES[self.output], self.index, strict=True)
        )
        return f"{self.output}[{where}]: expected {self.expected}, got {self.got}"


def _as_placement(result: object) -> Placement | Difference:
    """The candidate's result as three numpy arrays, or what is wrong with it."""
    if not isinstance(result, tuple | list) or len(result) != 3:
        return Difference("result", None, "a tuple (phy2log, log2phy, logcnt)", repr(result)[:80])
    try:
        phy2log, log2phy, logcnt = (np.asarray(out) for out in result)
    except (TypeError, ValueError, RuntimeError) as exc:
        return Difference("result", None, "arrays numpy.asarray converts", f"{exc}")
    return phy2log, log2phy, logcnt


def first_difference(expected: Placement, got: object) -> Difference | None:
    """The first entry where ``got`` differs from ``expected``, or None if equal.

    expected: (phy2log [L, R], log2phy [L, E, K], logcnt [L, E]) int64, the reference's.
    got: the candidate's result, anything ``numpy.asarray`` converts.

    Outputs are compared in the order phy2log, logcnt, log2phy (the placement
    first; log2phy is derived from it): shape, then dtype, then values.
    """
    placement = _as_placement(got)
    if isinstance(placement, Difference):
        return placement
    for position in (0, 2, 1):
        name, want, have = OUTPUT_NAMES[position], expected[position], placement[position]
        if want.shape != have.shape:
            return Difference(f"{name} shape", None, want.shape, have.shape)
        if want.dtype != have.dtype:
            return Difference(f"{name} dtype", None, want.dtype, have.dtype)
        unequal = np.argwhere(want != have)
        if unequal.size:
            index = tuple(int(i) for i in unequal[0])
            return Difference(name, index, want[index].item(), have[index].item())
    return None


def numpy_reference(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> Placement:
    """``eplb.reference.rebalance_experts`` (the canonical implementation).

    weight: [L, E] real, tokens routed to each logical expert in each layer.
    """
    from eplb.reference import rebalance_experts

    return rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)


def jax_reference(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> Placement:
    """``eplb.reference.jax.rebalance_experts`` with a ``jax.Array`` in and out.

    weight: [L, E] real (numpy); sent to JAX's default device in its own
        dtype where JAX holds it (float64/int64 need x64, enabled here for the
        conversion only), else passed as it is (JAX has no string arrays),
        for the implementation to refuse.
    """
    import jax

    from eplb.reference.jax import rebalance_experts

    device_weight: object = weight
    if isinstance(weight, np.ndarray) and weight.dtype.kind in "biufc":
        with jax.enable_x64(True):
            device_weight = jax.device_put(weight)
    result = rebalance_experts(device_weight, num_replicas, num_groups, num_nodes, num_gpus)
    for name, out in zip(OUTPUT_NAMES, result, strict=True):
        if not isinstance(out, jax.Array) or out.dtype != np.int64:
            raise TypeError(
                f"JAX {name} is {type(out).__name__} {getattr(out, 'dtype', '')}, "
                "expected an int64 jax.Array"
            )
    return tuple(np.asarray(out) for out in result)  # type: ignore[return-value]


def torch_production(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    device: str = "cpu",
    core: str = "numpy",
) -> Placement:
    """``eplb.production.rebalance_experts`` with a ``torch.Tensor`` in and out.

    weight: [L, E] real (numpy); becomes a tensor on ``device`` in its own
        dtype where torch holds it, else is passed as it is (torch has no
        string arrays), for the implementation to refuse.
    device: "cpu" or "cuda"; the outputs must come back on it.
    core: the placement core it runs (``"numpy"``, ``"compiled"`` or ``"auto"``).
    """
    import torch

    from eplb.production import rebalance_experts

    tensor: object = weight
    if isinstance(weight, np.ndarray) and weight.dtype.kind in "biufc":
        tensor = torch.from_numpy(np.ascontiguousarray(weight)).to(device)
    result = rebalance_experts(tensor, num_replicas, num_groups, num_nodes, num_gpus, core=core)
    for name, out in zip(OUTPUT_NAMES, result, strict=True):
        if (
            not isinstance(out, torch.Tensor)
            or out.dtype != torch.int64
            or out.device.type != torch.device(device).type
        ):
            raise TypeError(
                f"torch {name} is {type(out).__name__} {getattr(out, 'dtype', '')} on "
                f"{getattr(out, 'device', '?')}, expected an int64 tensor on {device}"
            )
    return tuple(out.cpu().numpy() for out in result)


def compiled_production(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> Placement:
    """``eplb.production.rebalance_experts(..., core="compiled")`` on CPU tensors.

    weight: [L, E] real (numpy), as for ``torch_production``.
    """
    return torch_production(
        weight, num_replicas, num_groups, num_nodes, num_gpus, "cpu", "compiled"
    )


def _torch_cuda(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> Placement:
    return torch_production(weight, num_replicas, num_groups, num_nodes, num_gpus, "cuda", "auto")


def project_implementations(
    *, jax: bool | None = True, cuda: bool | None = None, compiled: bool | None = None
) -> dict[str, Implementation]:
    """The project's implementations other than the numpy reference, by name.

    jax: include the JAX reference (it compiles once per shape and counts,
        seconds each: callers that draw many shapes leave it out); None: when
        JAX is installed (a serving machine may have torch only).
    cuda: include torch production on CUDA; None: when torch sees a GPU.
    compiled: include torch production's compiled core; None: where it loads
        (numba installed and able to compile).
    """
    impls: dict[str, Implementation] = {"torch production (cpu)": torch_production}
    if compiled is None:
        from eplb.production import compiled_core_error

        compiled = compiled_core_error() is None
    if compiled:
        impls["compiled core (cpu)"] = compiled_production
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        impls["torch production (cuda)"] = _torch_cuda
    if jax is None:
        jax = importlib.util.find_spec("jax") is not None
    if jax:
        impls["jax reference"] = jax_reference
    return impls


def check_agreement(
    weight: np.ndarray,
    counts: tuple[int, int, int, int],
    impls: Mapping[str, Implementation],
    reference: Implementation = numpy_reference,
) -> None:
    """Raise ``AssertionError`` unless every implementation returns the reference's placement.

    weight: [L, E] real, the load (each implementation gets its own copy).
    counts: (num_replicas, num_groups, num_nodes, num_gpus).
    """
    expected = _as_placement(reference(weight.copy(), *counts))
    assert not isinstance(expected, Difference), f"reference returned {expected}"
    for name, impl in impls.items():
        difference = first_difference(expected, impl(weight.copy(), *counts))
        if difference is not None:
            raise AssertionError(f"{name} differs from the reference: {difference}")


def check_refusal(
    weight: object,
    counts: tuple[object, object, object, object],
    impls: Mapping[str, Implementation],
    reference: Implementation = numpy_reference,
) -> type[Exception]:
    """Raise ``AssertionError`` unless every implementation refuses the input as the reference does.

    weight, counts: an invalid input (see ``strategies.invalid_problems``).
    Returns the exception type they all raised.
    """
    expected = _refusal(reference, weight, counts)
    assert expected is not None, "the reference accepted an invalid input"
    for name, impl in impls.items():
        got = _refusal(impl, weight, counts)
        if got is not expected:
            raised = "nothing" if got is None else got.__name__
            raise AssertionError(f"{name} raised {raised}, the reference {expected.__name__}")
    return expected


def _refusal(
    impl: Implementation, weight: object, counts: tuple[object, object, object, object]
) -> type[Exception] | None:
    """The type of the ValueError/TypeError ``impl`` raises, or None if it returns."""
    try:
        impl(weight, *counts)
    except (ValueError, TypeError) as exc:
        return type(exc)
    return None


def load_callable(spec: str) -> Implementation:
    """Import ``"package.module:function"`` (``"module:obj.attr"`` also works).

    The current directory is put on ``sys.path`` first, so that a module
    beside the caller (``tests.conformance_variants``, ``my_eplb``) imports
    without installing it. Raises ValueError naming the problem.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"--impl must be MODULE:FUNCTION, got {spec!r}")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise ValueError(f"{module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, attr)
    if not callable(target):
        raise ValueError(f"{spec!r} is not callable")
    return target
