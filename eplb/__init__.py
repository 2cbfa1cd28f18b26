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

import os as _os

from eplb._validation import EplbConfig, validate_config, validate_weight

# Imported from a source checkout (``python -m pytest`` at the repo root puts the
# checkout first on sys.path, ahead of an installed copy), the subpackages are
# the sibling folders pyproject's package-dir maps them from: look there too.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "production", "__init__.py")) and _os.path.isfile(
    _os.path.join(_checkout, "pyproject.toml")
):
    __path__.append(_checkout)

__version__ = "0.1.0"

__all__ = ["EplbConfig", "__version__", "validate_config", "validate_weight"]
