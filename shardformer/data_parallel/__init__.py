"""Data parallelism: the gradient reducer (bucketed dp mean, partial-copy sums). ZeRO comes here."""
from .reducer import GradReducer

__all__ = ["GradReducer"]
