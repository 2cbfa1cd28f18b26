"""``eplb simulate``: replay load windows through rebalancing and count what each rebalance moves.

Each policy starts from SPEC's placement for the first window; at every later
window it rebalances from the placement it holds (see SPEC.md):

- ``spec``: SPEC's placement for the window's load, as it is;
- ``relabel``: the same, relabelled (``relabel_for_migration``) so that the
  fewest experts cross the wire;
- ``migration``: the migration-aware policy (``rebalance_experts_migration_aware``).

Per rebalance and policy: balancedness of the window's load under the held
placement (before) and the new one (after), and the experts and bytes each GPU
receives (SPEC.md "Experts moved"). Heavy modules (torch, rich, matplotlib) are
imported inside ``_run`` so that ``eplb --help`` stays fast.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eplb._validation import validate_tolerance
from eplb.loads import read_load
from eplb.metrics import balancedness, experts_moved, gpu_loads

__all__ = ["DEEPSEEK_V3_EXPERT_BYTES", "add_parser", "drifting_windows"]

#: One DeepSeek-V3 routed expert: gate, up and down projections, each 7168 x 2048, bfloat16.
DEEPSEEK_V3_EXPERT_BYTES = 3 * 7168 * 2048 * 2  # 88,080,384
_POLICIES = ("spec", "relabel", "migration")


def add_parser(subparsers: Any, name: str) -> None:
    """Register ``eplb simulate``."""
    parser = subparsers.add_parser(
        name,
        help="replay load windows through rebalancing; balance and bytes moved per policy",
        description="Replay a sequence of load windows through rebalancing and report, per "
        "rebalance and policy, balancedness before and after and the experts and bytes each "
        "GPU receives. Several LOAD files are the windows in order; one file is cut into "
        "--windows windows: the file's load, then each window the previous one times a "
        "factor drawn uniformly from [1 - drift, 1 + drift] per layer and expert (seeded).",
    )
    parser.add_argument("loads", metavar="LOAD", nargs="+", help=".json, .npy or .pt [L, E]")
    parser.add_argument("--replicas", type=int, required=True, metavar="R", help="slots")
    parser.add_argument("--groups", type=int, required=True, metavar="G")
    parser.add_argument("--nodes", type=int, required=True, metavar="N")
    parser.add_argument("--gpus", type=int, required=True, metavar="P")
    parser.add_argument(
        "--policy", choices=(*_POLICIES, "all"), default="all", help="default: all three"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="migration policy: max GPU load <= (1 + tolerance) x SPEC's (default 0.01)",
    )
    parser.add_argument(
        "--expert-bytes",
        type=int,
        default=DEEPSEEK_V3_EXPERT_BYTES,
        help=f"bytes of one expert (default DeepSeek-V3's, {DEEPSEEK_V3_EXPERT_BYTES:,})",
    )
    parser.add_argument(
        "--windows", type=int, default=20, help="windows cut from one file (default 20)"
    )
    parser.add_argument(
        "--drift", type=float, default=0.1, help="largest change per expert per window (0.1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the drift (default 0)")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG over the rebalances to FILE")
    parser.set_defaults(run=_run)


def drifting_windows(
    load: np.ndarray, num_windows: int, drift: float, seed: int
) -> list[np.ndarray]:
    """``num_windows`` loads [L, E] float64: ``load``, then each the last times a drift.

    load: [L, E] real, the first window. Every later window multiplies the one
    before by a factor drawn uniformly from ``[1 - drift, 1 + drift]`` for every
    layer and expert (``numpy.random.default_rng(seed)``).
    """
    if num_windows < 2:
        raise ValueError(f"--windows must be >= 2 (one rebalance), got {num_windows}")
    if not 0 <= drift < 1:
        raise ValueError(f"--drift must be in [0, 1), got {drift}")
    rng = np.random.default_rng(seed)
    windows = [np.asarray(load, dtype=np.float64)]
    for _ in range(num_windows - 1):
        windows.append(windows[-1] * rng.uniform(1.0 - drift, 1.0 + drift, load.shape))
    return windows


@dataclass
class _Track:
    """What one policy did over the replay: one entry per rebalance."""

    before: list[float] = field(default_factory=list)  # mean balancedness, held placement
    after: list[float] = field(default_factory=list)  # mean balancedness, new placement
    moved: list[np.ndarray] = field(default_factory=list)  # [P] experts each GPU receives
    seconds: list[float] = field(default_factory=list)


def _mean_balancedness(load: np.ndarray, phy2log: np.ndarray, gpus: int, busy: np.ndarray) -> float:
    counts = np.stack([np.bincount(row, minlength=load.shape[1]) for row in phy2log])
    return float(balancedness(gpu_loads(load, phy2log, counts, gpus))[busy].mean())


def _run(args: argparse.Namespace) -> int:
    if args.plot is not None and Path(args.plot).suffix.lower() != ".png":
        raise ValueError(f"--plot must end in .png, got {args.plot!r}")
    validate_tolerance(args.tolerance, "--tolerance")
    if args.expert_bytes < 1:
        raise ValueError(f"--expert-bytes must be >= 1, got {args.expert_bytes}")
    if len(args.loads) == 1:
        windows = drifting_windows(read_load(args.loads[0]), args.windows, args.drift, args.seed)
        source = f"{Path(args.loads[0]).name}, {args.windows} windows drifting by up to "
        source += f"{args.drift:.0%} per expert (seed {args.seed})"
    else:
        windows = [read_load(path) for path in args.loads]
        if len({w.shape for w in windows}) != 1:
            raise ValueError(
                f"the LOAD files must have one shape, got {[w.shape for w in windows]}"
            )
        source = f"{len(windows)} files as windows"

    import torch
    from rich.console import Console
    from rich.progress import track

    from eplb.production import (
        rebalance_experts,
        rebalance_experts_migration_aware,
        relabel_for_migration,
    )

    counts = (args.replicas, args.groups, args.nodes, args.gpus)
    policy_nodes = args.nodes if args.groups % args.nodes == 0 else 1
    policies = _POLICIES if args.policy == "all" else (args.policy,)
    # Wide enough for the table when the output is not a terminal (80 columns).
    console = Console(highlight=False, soft_wrap=True, width=max(Console().width, 110))
    # Idle layers (DeepSeek's dense layers hold no load) are left out of the means.
    busy = np.asarray(windows[0]).sum(-1) > 0

    first = rebalance_experts(torch.from_numpy(windows[0]), *counts)[0]
    held = dict.fromkeys(policies, first)
    tracks = {p: _Track() for p in policies}
    steps = range(1, len(windows))
    for k in track(steps, description="rebalancing", console=Console(stderr=True)):
        load = torch.from_numpy(windows[k])
        for policy in policies:
            old = held[policy]
            start = time.perf_counter()
            if policy == "migration":
                new = rebalance_experts_migration_aware(
                    load, *counts, old_phy2log=old, tolerance=args.tolerance
                )[0]
            else:
                new = rebalance_experts(load, *counts)[0]
                if policy == "relabel":
                    new = relabel_for_migration(old, new, policy_nodes, args.gpus)
            seconds = time.perf_counter() - start
            record = tracks[policy]
            record.seconds.append(seconds)
            record.before.append(_mean_balancedness(windows[k], old.numpy(), args.gpus, busy))
            record.after.append(_mean_balancedness(windows[k], new.numpy(), args.gpus, busy))
            record.moved.append(experts_moved(old.numpy(), new.numpy(), args.gpus).sum(0))
            held[policy] = new

    _print_report(console, args, source, windows, busy, tracks)
    if args.plot:
        _plot(Path(args.plot), tracks, args.expert_bytes, source)
        console.print(f"plot written to {args.plot}")
    return 0


def _print_report(
    console: Any,
    args: argparse.Namespace,
    source: str,
    windows: list[np.ndarray],
    busy: np.ndarray,
    tracks: dict[str, _Track],
) -> None:
    from rich.table import Table

    num_layers, num_experts = windows[0].shape
    console.print(
        f"[bold]eplb simulate[/bold] {source}: {num_layers} layers ({int(busy.sum())} with "
        f"load) x {num_experts} experts -> {args.replicas} slots, {args.groups} groups, "
        f"{args.nodes} nodes, {args.gpus} GPUs; {len(windows) - 1} rebalances; "
        f"expert {args.expert_bytes:,} bytes; migration tolerance {args.tolerance}"
    )
    gib = float(2**30)
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column in (
        "policy",
        "bal. before",
        "bal. after",
        "experts/GPU",
        "max",
        "GiB/GPU",
        "max",
        "GiB total",
        "vs spec",
        "ms",
    ):
        table.add_column(column, justify="left" if column == "policy" else "right")
    spec_bytes = None
    if "spec" in tracks:
        spec_bytes = float(np.sum(tracks["spec"].moved)) * args.expert_bytes
    for policy, record in tracks.items():
        moved = np.stack(record.moved)  # [rebalances, P]
        total = float(moved.sum()) * args.expert_bytes
        ratio = "" if not spec_bytes else f"1/{spec_bytes / total:.1f}" if total else "0"
        table.add_row(
            policy,
            f"{np.mean(record.before):.4f}",
            f"{np.mean(record.after):.4f}",
            f"{moved.mean():.1f}",
            f"{int(moved.max())}",
            f"{moved.mean() * args.expert_bytes / gib:.2f}",
            f"{moved.max() * args.expert_bytes / gib:.2f}",
            f"{total / gib:.1f}",
            ratio,
            f"{np.median(record.seconds) * 1e3:.0f}",
        )
    console.print(table)
    console.print(
        "per rebalance, means over rebalances: balancedness (mean over layers with load) of "
        "the window's load under the held placement (before) and the new one (after); experts "
        "and GiB each GPU receives (mean over GPUs, and the busiest GPU); GiB total over the "
        "replay; median ms per rebalance (eplb.production, CPU)"
    )


def _plot(path: Path, tracks: dict[str, _Track], expert_bytes: int, source: str) -> None:
    """PNG: mean balancedness after each rebalance, and the GiB each rebalance moves."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or CI
    import matplotlib.pyplot as plt

    fig, (ax_bal, ax_bytes) = plt.subplots(1, 2, figsize=(13, 4.5))
    for policy, record in tracks.items():
        steps = np.arange(1, len(record.after) + 1)
        ax_bal.plot(steps, record.after, marker=".", label=f"{policy}, after")
        gib = np.array([m.sum() for m in record.moved]) * expert_bytes / 2**30
        ax_bytes.plot(steps, gib, marker=".", label=policy)
    first = next(iter(tracks.values()))
    ax_bal.plot(
        np.arange(1, len(first.before) + 1),
        first.before,
        linestyle=":",
        color="gray",
        label=f"{next(iter(tracks))}, before",
    )
    ax_bal.set(title="balancedness (mean over layers)", xlabel="rebalance", ylabel="mean / max")
    ax_bal.legend()
    ax_bytes.set(title="GiB received, all GPUs", xlabel="rebalance", ylabel="GiB")
    ax_bytes.set_yscale("symlog")
    ax_bytes.legend()
    fig.suptitle(source)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
