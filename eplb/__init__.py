"""eplb: expert-parallel load balancing for Mixture-of-Experts serving.

The placement algorithm is DeepSeek's hierarchical EPLB, defined exactly in
SPEC.md. Three implementations return the same integers for every valid input:

- ``eplb.reference``: numpy, the spec as code (and ``eplb.reference.jax``).
- ``eplb.production``: torch, for serving.
- ``eplb.conformance``: the suite that proves they agree.
- ``eplb.integrations``: the placement behind vLLM's and SGLang's policy interfaces.

This umbrella module holds only what they share; importing it imports neither
torch nor JAX.
"""

from eplb._validation import EplbConfig, validate_config, validate_weight

__version__ = "0.1.0"

__all__ = ["EplbConfig", "__version__", "validate_config", "validate_weight"]
