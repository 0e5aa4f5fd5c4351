"""srm_ext: fast Sparse Representation Matching (SRM) knowledge distillation.

The five SRM ops (:func:`sparse_encode`, :func:`sparse_decode`,
:func:`reconstruction_loss`, :func:`sparse_labels`, :func:`predictor_loss`) run
fused C++/CUDA kernels when the compiled extension is present and fall back to
:mod:`srm_ext.reference` otherwise; :func:`backend_info` tells which.
"""

from . import _backend, reference
from ._backend import backend_info
from .functional import (
    predictor_loss,
    reconstruction_loss,
    sparse_decode,
    sparse_encode,
    sparse_labels,
)
from .modules import SparseCodePredictor, SparseRepresentation
from .distill.distiller import SRMDistiller

if _backend.native_module is not None:
    from . import _op_registration  # noqa: F401  (fake kernels and autograd)

__version__ = "0.1.0"

__all__ = [
    "SRMDistiller",
    "SparseCodePredictor",
    "SparseRepresentation",
    "backend_info",
    "predictor_loss",
    "reconstruction_loss",
    "reference",
    "sparse_decode",
    "sparse_encode",
    "sparse_labels",
]
