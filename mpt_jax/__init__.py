"""mpt-jax: MosaicML's MPT models in JAX/Flax."""

from mpt_jax.config import MPTConfig
from mpt_jax.load import load
from mpt_jax.model import MPT

__all__ = ["MPT", "MPTConfig", "load"]
__version__ = "0.1.0"
