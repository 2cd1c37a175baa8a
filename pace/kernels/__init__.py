"""Triton kernels of PACEAttention's small dense work, as torch custom ops with PyTorch fallbacks.

Ridge step (``ridge``): normalised Gram, inverse Cholesky factor, the backward's c × c chain
(``ridge_gradient_matrix``, ``ridge_radial_diagonal``). Separate Compress operator (``memberships``).
Fused mixer (``mixer_ops``): GEMM 1's right factor (``expand_basis``), the memberships with GEMM 2's left factor and
their backward (``mixer_memberships``, ``mixer_memberships_backward``, ``mixer_heads_backward``), the backward's
prologue (``cast_dot``);
the diag form's memberships and their backward (``diag_ops``: ``diag_memberships``, ``diag_memberships_backward``);
GEMM 2 and x̄ as one fp32-accumulated sum of products (``gemm``: ``matmul_sum``); the block's LayerNorm as its
prologue and epilogue (``norm_ops``: ``layer_norm_cast``, ``layer_norm_backward``).

Importing this package registers the ``pace::`` ops and imports nothing else (Triton is imported on first use).
Backend per call: Triton on CUDA tensors when it imports, PyTorch otherwise; ``PACE_TRITON=off`` or
``use_backend("off")`` forces PyTorch, ``PACE_TRITON=interpret`` (or ``TRITON_INTERPRET=1``) or
``use_backend("interpret")`` runs the Triton kernels on CPU tensors through the interpreter.
"""

from pace.kernels._dispatch import BACKENDS, current_backend, use_backend
from pace.kernels.diag_ops import (
    diag_memberships,
    diag_memberships_backward,
    diag_memberships_backward_reference,
    diag_memberships_reference,
)
from pace.kernels.gemm import matmul_sum, matmul_sum_reference
from pace.kernels.memberships import compress_memberships, compress_memberships_reference
from pace.kernels.mixer_ops import (
    cast_dot,
    cast_dot_reference,
    expand_basis,
    expand_basis_reference,
    mixer_heads_backward,
    mixer_heads_backward_reference,
    mixer_memberships,
    mixer_memberships_backward,
    mixer_memberships_backward_reference,
    mixer_memberships_reference,
)
from pace.kernels.norm_ops import (
    layer_norm_backward,
    layer_norm_backward_reference,
    layer_norm_cast,
    layer_norm_cast_reference,
)
from pace.kernels.ridge import (
    inverse_cholesky_factor,
    inverse_cholesky_factor_reference,
    normalized_gram,
    normalized_gram_reference,
    ridge_gradient_matrix,
    ridge_gradient_matrix_reference,
    ridge_radial_diagonal,
    symmetric_gradient,
)

__all__ = [
    "BACKENDS",
    "cast_dot",
    "cast_dot_reference",
    "compress_memberships",
    "compress_memberships_reference",
    "current_backend",
    "diag_memberships",
    "diag_memberships_backward",
    "diag_memberships_backward_reference",
    "diag_memberships_reference",
    "expand_basis",
    "expand_basis_reference",
    "inverse_cholesky_factor",
    "inverse_cholesky_factor_reference",
    "layer_norm_backward",
    "layer_norm_backward_reference",
    "layer_norm_cast",
    "layer_norm_cast_reference",
    "matmul_sum",
    "matmul_sum_reference",
    "mixer_heads_backward",
    "mixer_heads_backward_reference",
    "mixer_memberships",
    "mixer_memberships_backward",
    "mixer_memberships_backward_reference",
    "mixer_memberships_reference",
    "normalized_gram",
    "normalized_gram_reference",
    "ridge_gradient_matrix",
    "ridge_gradient_matrix_reference",
    "ridge_radial_diagonal",
    "symmetric_gradient",
    "use_backend",
]
