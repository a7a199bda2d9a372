"""Evaluation: scoring (``scoring``), perplexity, LLM Foundry's ICL tasks, sandboxed code
evaluation and the lm-evaluation-harness backend (``python -m mpt_jax.eval``)."""


def _register_with_lm_eval() -> None:
    """Names ``mpt_jax`` in lm-eval's model registry when lm-eval is installed, lazily (the backend
    module loads when lm-eval first asks for it). lm-eval's own backends are listed first: its
    ``get_model`` lists them only into an empty registry."""
    try:
        import lm_eval.models  # noqa: F401  (registers lm-eval's own backends)
        from lm_eval.api.registry import model_registry
    except ImportError:
        return
    if "mpt_jax" not in model_registry:
        model_registry.register("mpt_jax", target="mpt_jax.eval.harness:MPTJaxLM")


_register_with_lm_eval()
