"""Which kernel runs each layer: rules measured on real machines (rules.py). fastinfer.convert asks;
the answers are decisions (a format, or None for dense), never pointers or modules."""

from fastinfer.plan.rules import DEFAULT_RULE, SparseRule, choose_format

__all__ = ["DEFAULT_RULE", "SparseRule", "choose_format"]
