"""Argument checks shared by the PACE operators, with errors that name the offending value."""


def check_sizes(dim: int, num_heads: int, rank: int, eps: float) -> None:
    """Validate the sizes every PACE operator shares.

    Args:
        dim: Token width C.
        num_heads: Number of heads K; must divide ``dim``.
        rank: Subspace rank r; ``rank * num_heads <= dim`` (so also ``rank <= dim // num_heads``).
        eps: Ridge ε; must be positive.
    """
    if dim < 1 or num_heads < 1:
        raise ValueError(f"dim and num_heads must be positive, got dim={dim}, num_heads={num_heads}")
    if dim % num_heads:
        raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    if rank * num_heads > dim:
        raise ValueError(f"rank * num_heads must not exceed dim, got {rank} * {num_heads} > {dim}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
