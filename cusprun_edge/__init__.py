"""cusprun-edge: prune a general causal LLM into a small expert (Cus-Prun) and compile it for the edge."""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402
from .expert_io import load_expert  # noqa: E402
from .models import load_model  # noqa: E402

__all__ = ["UserError", "load_expert", "load_model", "__version__"]
