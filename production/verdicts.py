"""The verdicts of a guarded call's agreement: what a rank posts, and how they are compared.

Each rank posts ``{"ok": True, "fields": {name: fingerprint(value)}}`` for the
arguments that shape the plan or the wire, or ``{"ok": False, "reason": text}``
when its checks raised (see :meth:`eplb.production.group_guard.GuardedCall.agree`).
Every rank compares the same posts, so every rank reaches the same verdict.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from .errors import AgreementError

__all__ = ["compare_verdicts", "fingerprint"]


def fingerprint(value: object) -> tuple[str, str]:
    """(digest, short description) of an argument: equal values give equal digests."""
    h = hashlib.blake2b(digest_size=12)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        h.update(repr((str(value.dtype), value.shape)).encode())
        h.update(np.ascontiguousarray(value).tobytes())
        summary = f"{value.dtype} array {list(value.shape)}"
    else:
        text = repr(value)
        h.update(text.encode())
        summary = text if len(text) <= 80 else text[:77] + "..."
    return h.hexdigest(), summary


def compare_verdicts(verdicts: list[dict[str, Any]]) -> None:
    """Raise AgreementError on a refusal or on the first argument whose value differs."""
    refused = [(r, v["reason"]) for r, v in enumerate(verdicts) if not v["ok"]]
    if refused:
        reasons = "; ".join(f"rank {r}: {reason}" for r, reason in refused)
        raise AgreementError(
            f"rank(s) {[r for r, _ in refused]} of the group refused their input ({reasons}); "
            "no weights were changed",
            argument=None,
            ranks=tuple(r for r, _ in refused),
        )
    first = verdicts[0]["fields"]
    names = list(first) + sorted({n for v in verdicts for n in v["fields"]} - set(first))
    for name in names:
        seen = [v["fields"].get(name) for v in verdicts]
        if all(s == seen[0] for s in seen):
            continue
        differ = tuple(r for r, s in enumerate(seen) if s != seen[0])
        described = ", ".join(
            f"rank {r}: {s[1] if s is not None else 'absent'}" for r, s in enumerate(seen)
        )
        raise AgreementError(
            f"{name} must be the same on every rank of the group; it differs ({described}). "
            "No weights were changed",
            argument=name,
            ranks=differ,
        )
