"""sdsjax: text prompt -> 3D morphable head, fitted by Score Distillation Sampling in JAX."""

__version__ = "0.1.0"
