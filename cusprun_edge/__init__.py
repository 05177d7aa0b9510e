"""cusprun-edge: prune a general causal LLM into a small expert (Cus-Prun) and compile it for the edge."""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402

__all__ = ["UserError", "load_expert", "load_model", "write_hf_compat", "__version__"]


def __getattr__(name):
    # Lazy: `cusprun-edge --help` and bad-input errors should not wait for torch to import.
    if name == "load_model":
        from .model.load import load_model

        return load_model
    if name == "load_expert":
        from .model.expert_io import load_expert

        return load_expert
    if name == "write_hf_compat":
        from .model.expert_io import write_hf_compat

        return write_hf_compat
    raise AttributeError(name)
