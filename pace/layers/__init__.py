"""PACEAttention primitives, one per file."""
