"""bgjax: background-bias research in JAX/Flax (ImageNet-9 variants, early/late masking)."""

__version__ = "0.1.0"
