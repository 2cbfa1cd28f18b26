"""The production benchmark configurations, filled with real DeepSeek-R1 loads.

The real statistics are ``[58, 256]`` (DeepSeek-V3/R1: 58 MoE layers, 256
routed experts). The other models' shapes are derived from them, so that
every configuration sees real skew and real integer ties:

- DeepSeek-V2-Lite-like, 64 experts: adjacent groups of 4 experts summed
  (expert ``e`` of the result is experts ``4e .. 4e+3``), first 26 layers.
- Qwen3-235B-like, 128 experts: adjacent pairs summed; 94 layers by cycling
  the 58 real ones (layer ``l`` is real layer ``l mod 58``).
- Kimi-K2-like, 384 experts: the 256 real experts followed by a copy of the
  first 128 (so experts ``256 + e`` and ``e`` carry equal loads: exact ties
  between experts of different groups and nodes, which real deployments of
  replicated experts also see); 60 layers by cycling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["BENCHMARK_MODELS", "BENCHMARK_SHAPES", "Workload", "benchmark_workloads", "derive_load"]


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration with one real load.

    weight: [L, E] float64, tokens routed to each logical expert in each layer.
    """

    model: str
    source: str
    weight: np.ndarray = field(repr=False)
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int

    @property
    def counts(self) -> tuple[int, int, int, int]:
        """``(num_replicas, num_groups, num_nodes, num_gpus)``, in call order."""
        return (self.num_replicas, self.num_groups, self.num_nodes, self.num_gpus)

    @property
    def name(self) -> str:
        """``model[source]``, e.g. ``DeepSeek-V3 R=288[prefill_in1024]``."""
        return f"{self.model}[{self.source}]"


#: model -> (num_experts, num_layers, R, G, N, P): the configurations that
#: benchmarks/bench_rebalance.py times and the conformance suite fills with real
#: loads. Kimi-K2 (no expert groups, 8 nodes: G % N != 0) takes the global policy.
BENCHMARK_SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "DeepSeek-V2-Lite R=64": (64, 26, 64, 1, 1, 8),
    "DeepSeek-V2-Lite R=72": (64, 26, 72, 1, 1, 8),
    "DeepSeek-V3 R=288": (256, 58, 288, 8, 4, 32),
    "DeepSeek-V3 R=320": (256, 58, 320, 8, 8, 64),
    "Qwen3-235B R=144": (128, 94, 144, 1, 1, 16),
    "Kimi-K2 R=448": (384, 60, 448, 1, 8, 64),
}
#: The models of the production benchmark list, by name.
BENCHMARK_MODELS: tuple[str, ...] = tuple(BENCHMARK_SHAPES)


def derive_load(real: np.ndarray, num_experts: int, num_layers: int) -> np.ndarray:
    """A ``[num_layers, num_experts]`` load derived from a real ``[58, 256]`` one (module doc).

    real: [layers, 256] float64, real tokens routed to each expert.
    """
    layers, experts = real.shape
    if num_experts <= experts:
        # Sum adjacent blocks: expert e of the result is real experts e*b .. e*b+b-1.
        load = real.reshape(layers, num_experts, experts // num_experts).sum(axis=-1)
    else:
        load = np.concatenate([real, real[:, : num_experts - experts]], axis=1)
    return np.take(load, np.arange(num_layers) % layers, axis=0)


def benchmark_workloads(
    real_loads: dict[str, np.ndarray], models: tuple[str, ...] | None = None
) -> list[Workload]:
    """Every (model, real load) pair of the benchmark list.

    real_loads: workload name -> [58, 256] float64, as ``eplb.loads.real_loads()``.
    models: names from ``BENCHMARK_MODELS`` (default: all of them).
    """
    chosen = BENCHMARK_SHAPES if models is None else {m: BENCHMARK_SHAPES[m] for m in models}
    return [
        Workload(model, source, derive_load(real, experts, layers), *counts)
        for model, (experts, layers, *counts) in chosen.items()
        for source, real in real_loads.items()
    ]
