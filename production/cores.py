"""Which placement core computes ``rebalance_experts``: the compiled one or the numpy one.

Both return SPEC.md's integers. The compiled core (``compiled_core``, numba)
is faster and computes the whole placement without the interpreter lock; the
numpy core (``_packing``) needs nothing beyond numpy. The choice, in order:

1. the ``core`` argument of ``rebalance_experts`` (``"compiled"``, ``"numpy"``,
   or ``"auto"``);
2. else the ``EPLB_CORE`` environment variable (the same three words);
3. else ``"auto"``: the compiled core where it loads (numba installed and able
   to compile), the numpy core otherwise.

Asking for ``"compiled"`` where it cannot load raises ``RuntimeError`` saying
why; ``"auto"`` falls back silently (``compiled_core_error()`` says why).

The compiled core loads (compiles, or reads numba's on-disk cache) the first
time it is needed, or when ``warm_up_placement()`` is called: ``ExpertBalancer`` calls it
when created, so no placement on the serving path waits for a compiler.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from types import ModuleType

__all__ = [
    "CORES",
    "ENV_VAR",
    "compiled_core_error",
    "load_compiled_core",
    "resolve_core",
    "warm_up_placement",
]

#: The values the ``core`` argument and ``EPLB_CORE`` accept.
CORES = ("auto", "compiled", "numpy")
#: The environment variable that chooses the core when no argument does.
ENV_VAR = "EPLB_CORE"

_lock = threading.Lock()
# None: not tried yet; else (module or None, why it did not load or None).
_loaded: tuple[ModuleType | None, str | None] | None = None


def load_compiled_core() -> ModuleType | None:
    """The compiled core module, loading it on first call; None where it cannot load.

    Thread-safe: a balancer's worker thread and the serving thread may ask at
    once; the module is imported (and compiled) once.
    """
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                module = importlib.import_module(".compiled_core", __package__)
                _loaded = (module, None)
            except Exception as exc:  # numba missing, or it cannot compile here
                _loaded = (None, f"{type(exc).__name__}: {exc}")
        return _loaded[0]


def compiled_core_error() -> str | None:
    """Why the compiled core cannot load (loading it if not tried yet), or None if it loads."""
    load_compiled_core()
    assert _loaded is not None
    return _loaded[1]


def resolve_core(core: str | None = None) -> str:
    """The core a call with ``core`` uses: ``"compiled"`` or ``"numpy"``.

    core: ``"auto"``, ``"compiled"``, ``"numpy"``, or None for ``$EPLB_CORE``
        (``"auto"`` when unset or empty).

    Raises ValueError for any other value (naming the argument or the
    variable), RuntimeError when ``"compiled"`` is asked for and cannot load.
    """
    source = "core"
    if core is None:
        core, source = os.environ.get(ENV_VAR, "") or "auto", ENV_VAR
    if not isinstance(core, str) or core not in CORES:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, CORES))}, got {core!r}")
    if core == "numpy":
        return "numpy"
    if load_compiled_core() is not None:
        return "compiled"
    if core == "compiled":
        raise RuntimeError(
            f"{source}='compiled' was asked for, but the compiled core cannot load: "
            f"{compiled_core_error()}"
        )
    return "numpy"


def warm_up_placement(core: str | None = None) -> tuple[str, float]:
    """Load the core that ``rebalance_experts(core=core)`` uses, now.

    Returns that core's name and the seconds loading it took.

    For the compiled core that is numba's compilation, or the read of its
    on-disk cache; for the numpy core nothing. Call it at start-up (the
    balancer does) so that the first placement does not pay for it.
    """
    start = time.perf_counter()
    chosen = resolve_core(core)
    return chosen, time.perf_counter() - start
