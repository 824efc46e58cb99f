"""ITRD: Information Theoretic Representation Distillation, as a library."""

__version__ = "0.1.0"
