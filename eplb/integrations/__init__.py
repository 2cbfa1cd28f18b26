"""Drop-in adapters: SPEC.md's placement behind a serving engine's own policy interface.

- ``eplb.integrations.vllm``: vLLM's EPLB policy (``EplbPolicy``, a stand-in
  for ``DefaultEplbPolicy``) and its older ``rebalance_experts`` function.
- ``eplb.integrations.sglang``: SGLang's ``rebalance_experts`` dispatch
  (``EplbAlgorithm``, ``compute_algorithm``) and its ``deepseek`` algorithm.

Each adapter takes the engine's argument names, inputs and return values,
and raises the engine's exception type (``AssertionError``, which engines
catch around their ``assert``-based policies) with eplb's message naming the
argument and the rule. Neither engine is imported: the adapters need torch
and eplb only. Importing this package imports nothing.
"""

__all__: list[str] = []
