"""Argument checks shared by the reference and the compiled ops.

Every public function validates its arguments here first, so that bad input
raises a ``ValueError``/``TypeError`` naming the argument instead of reaching a
kernel. The checks of values (index and label ranges) read the tensors, a
device sync on a GPU: :mod:`srm_ext.functional` leaves them to the op it calls
(``check_ranges=False``), and the compiled ops and the reference make them once,
raising the same ``ValueError``.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import Tensor
from torch._C import _functorch

__all__ = [
    "as_int",
    "as_float",
    "check_feature_map",
    "check_dictionary",
    "check_intercept",
    "check_k",
    "check_sparse_code",
    "check_labels",
    "check_same_dtype_device",
    "check_loss_weight",
]


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    # Sparse, MKL-DNN and nested tensors have no kernels here (nested ones
    # report a strided layout).
    if t.layout != torch.strided or t.is_nested:
        kind = "nested" if t.is_nested else str(t.layout).removeprefix("torch.")
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {kind} tensor")
    return t


# The floating dtypes the ops compute in; float8 and smaller have no matmul.
_FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_floating(name: str, t: Tensor) -> None:
    if t.dtype not in _FLOATING_DTYPES:
        raise TypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32 or "
            f"float64), got {t.dtype}"
        )


def check_feature_map(name: str, t: object) -> Tensor:
    """A 4-D (N, C, H, W) floating feature map."""
    t = _check_tensor(name, t)
    if t.dim() != 4:
        raise ValueError(
            f"{name} must be a 4-D (N, C, H, W) feature map, got shape {tuple(t.shape)}"
        )
    _check_floating(name, t)
    return t


def _check_dictionary_matrix(t: object) -> Tensor:
    """A 2-D floating tensor, the shape of any (D, K) dictionary."""
    t = _check_tensor("dictionary", t)
    if t.dim() != 2:
        raise ValueError(
            f"dictionary must be a 2-D (D, K) tensor, got shape {tuple(t.shape)}"
        )
    _check_floating("dictionary", t)
    return t


def _check_dictionary_rows(t: Tensor, detail: str = "") -> None:
    # Every backend needs a feature to compare; the CUDA kernels refuse D = 0.
    if t.shape[0] < 1:
        raise ValueError(
            f"dictionary must have at least one row (D >= 1), got shape (0, K){detail}"
        )


def check_dictionary(t: object, channels: int, feature_name: str = "x") -> Tensor:
    """A (D, K) floating dictionary whose D matches the feature map's channels."""
    t = _check_dictionary_matrix(t)
    if t.shape[0] != channels:
        raise ValueError(
            f"dictionary has D={t.shape[0]} rows but {feature_name} has "
            f"{channels} channels; expected dictionary of shape ({channels}, K)"
        )
    _check_dictionary_rows(t, f": {feature_name} has no channels")
    if t.shape[1] < 1:
        raise ValueError("dictionary must have at least one codeword (K >= 1)")
    return t


def check_intercept(t: object) -> Tensor:
    t = _check_tensor("intercept", t)
    if t.numel() != 1:
        raise ValueError(
            f"intercept must have exactly one element, got shape {tuple(t.shape)}"
        )
    _check_floating("intercept", t)
    return t


def as_int(name: str, value: object) -> int:
    """``value`` as a Python int: any integral number (a NumPy integer too),
    but no bool, float or tensor."""
    if not isinstance(value, (bool, Tensor)):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def as_float(name: str, value: object) -> float:
    """``value`` as a Python float: any real number (a NumPy scalar too), but
    no bool or tensor."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def check_k(k: object, num_codewords: int) -> int:
    k = as_int("k", k)
    if not 1 <= k <= num_codewords:
        raise ValueError(
            f"k must satisfy 1 <= k <= K={num_codewords} (the number of codewords), got {k}"
        )
    return k


def check_same_dtype_device(**tensors: Tensor) -> None:
    """All tensors share the first one's dtype and device."""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                "expected the same dtype"
            )
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "expected the same device"
            )


def check_sparse_code(
    values: object,
    indices: object,
    num_codewords: int | None = None,
    *,
    check_ranges: bool = True,
) -> tuple[Tensor, Tensor]:
    """values (N, H, W, k) floating and indices (N, H, W, k) int64 in [0, K)."""
    values = _check_tensor("values", values)
    indices = _check_tensor("indices", indices)
    if values.dim() != 4:
        raise ValueError(
            f"values must be a 4-D (N, H, W, k) tensor, got shape {tuple(values.shape)}"
        )
    _check_floating("values", values)
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must have dtype torch.int64, got {indices.dtype}")
    if indices.shape != values.shape:
        raise ValueError(
            f"indices has shape {tuple(indices.shape)} but values has "
            f"{tuple(values.shape)}; expected equal (N, H, W, k) shapes"
        )
    if indices.device != values.device:
        raise ValueError(
            f"indices is on {indices.device} but values is on {values.device}"
        )
    if values.shape[-1] < 1:
        raise ValueError("values and indices must keep at least one entry (k >= 1)")
    if num_codewords is not None:
        if values.shape[-1] > num_codewords:
            raise ValueError(
                f"values keeps k={values.shape[-1]} entries per pixel but there are "
                f"only K={num_codewords} codewords"
            )
        if check_ranges:
            _check_index_range("indices", indices, num_codewords)
    return values, indices


def _check_index_range(name: str, indices: Tensor, bound: int) -> None:
    if _is_fake(indices):
        return
    _check_within_bound(name, *_value_ranges(indices)[0], bound)


def _check_within_bound(name: str, lo: float, hi: float, bound: int) -> None:
    if lo < 0 or hi >= bound:
        raise ValueError(f"{name} must lie in [0, {bound}), got values in [{lo:.0f}, {hi:.0f}]")


def _value_ranges(*tensors: Tensor) -> list[tuple[float, float]]:
    """(min, max) of each tensor ((inf, -inf) if empty), all from one
    read-back: one device sync on a GPU, however many tensors. In float64,
    which holds every index below 2^53 exactly, so comparing with a bound is
    exact. The tensors must share a device."""
    tensors = [_unwrapped(t.detach()) for t in tensors]
    ends = [
        torch.stack(torch.aminmax(t)).double()
        if t.numel()
        else torch.tensor([math.inf, -math.inf], dtype=torch.float64, device=t.device)
        for t in tensors
    ]
    flat = torch.cat(ends).tolist()
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _unwrapped(t: Tensor) -> Tensor:
    """The tensor under torch.func's wrappers, which can hold no Python
    numbers: under vmap, the values of every sample."""
    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    return t


def _is_fake(t: Tensor) -> bool:
    # Data-dependent checks are skipped while tracing (torch.compile, fake tensors).
    return (
        torch.compiler.is_compiling()
        or isinstance(t, torch._subclasses.FakeTensor)
        or t.device.type == "meta"
    )


def check_labels(
    pixel_labels: object,
    image_labels: object,
    y: Tensor,
    num_codewords: int,
    *,
    check_ranges: bool = True,
) -> tuple[Tensor, Tensor]:
    """pixel_labels (N, H, W) int64 in [0, K); image_labels (N, K) in [0, 1]."""
    n, _, h, w = y.shape
    pixel_labels = _check_tensor("pixel_labels", pixel_labels)
    image_labels = _check_tensor("image_labels", image_labels)
    if pixel_labels.dtype != torch.int64:
        raise TypeError(
            f"pixel_labels must have dtype torch.int64, got {pixel_labels.dtype}"
        )
    if tuple(pixel_labels.shape) != (n, h, w):
        raise ValueError(
            f"pixel_labels must have shape (N, H, W) = {(n, h, w)} to match y, "
            f"got {tuple(pixel_labels.shape)}"
        )
    if tuple(image_labels.shape) != (n, num_codewords):
        raise ValueError(
            f"image_labels must have shape (N, K) = {(n, num_codewords)}, "
            f"got {tuple(image_labels.shape)}"
        )
    _check_floating("image_labels", image_labels)
    check_same_dtype_device(y=y, image_labels=image_labels)
    if pixel_labels.device != y.device:
        raise ValueError(f"pixel_labels is on {pixel_labels.device} but y is on {y.device}")
    if check_ranges and not (_is_fake(pixel_labels) or _is_fake(image_labels)):
        (pixel_lo, pixel_hi), (image_lo, image_hi) = _value_ranges(pixel_labels, image_labels)
        _check_within_bound("pixel_labels", pixel_lo, pixel_hi, num_codewords)
        if not (image_lo >= 0.0 and image_hi <= 1.0):
            got = "NaN" if math.isnan(image_lo) else f"values in [{image_lo}, {image_hi}]"
            raise ValueError(f"image_labels must lie in [0, 1], got {got}")
    return pixel_labels, image_labels


# One validator per public function, shared by the reference and the dispatcher.
# They return the scalar arguments as Python numbers, which the ops' schemas
# take (a NumPy integer is not an int to them).


def validate_encode(x: object, dictionary: object, intercept: object, k: object) -> int:
    """Returns k."""
    x = check_feature_map("x", x)
    dictionary = check_dictionary(dictionary, x.shape[1])
    intercept = check_intercept(intercept)
    check_same_dtype_device(x=x, dictionary=dictionary, intercept=intercept)
    return check_k(k, dictionary.shape[1])


def validate_decode(
    values: object, indices: object, dictionary: object, *, check_ranges: bool = True
) -> None:
    dictionary = _check_dictionary_matrix(dictionary)
    _check_dictionary_rows(dictionary)
    values, _ = check_sparse_code(
        values, indices, dictionary.shape[1], check_ranges=check_ranges
    )
    check_same_dtype_device(values=values, dictionary=dictionary)


def validate_labels(
    values: object, indices: object, num_codewords: object, *, check_ranges: bool = True
) -> int:
    """Returns num_codewords."""
    num_codewords = as_int("num_codewords", num_codewords)
    if num_codewords < 1:
        raise ValueError(f"num_codewords must be >= 1, got {num_codewords}")
    values, _ = check_sparse_code(values, indices, num_codewords, check_ranges=check_ranges)
    n, h, w, _ = values.shape
    if n * num_codewords * 8 >= 2**63:  # 8: the widest element of the (N, K) image labels
        raise ValueError(
            f"num_codewords={num_codewords} is too large: image labels of shape "
            f"({n}, {num_codewords}) exceed the largest tensor"
        )
    if h * w == 0:
        # The image labels are means over each image's pixels: with none there are none.
        raise ValueError(
            "values must have at least one pixel per image (H*W > 0), got shape "
            f"{tuple(values.shape)}"
        )
    return num_codewords


# The largest loss weight the kernels can take: they scale in float32.
_MAX_LOSS_WEIGHT = torch.finfo(torch.float32).max


def check_loss_weight(name: str, weight: object) -> float:
    """``weight`` as a float. A loss weight must be finite and >= 0: NaN or inf
    would turn the loss and every gradient into NaN, and a negative one would
    train against the labels."""
    weight = as_float(name, weight)
    if not 0.0 <= weight < float("inf"):
        raise ValueError(f"{name} must be finite and >= 0, got {weight}")
    if weight > _MAX_LOSS_WEIGHT:
        raise ValueError(
            f"{name} must be at most {_MAX_LOSS_WEIGHT:.4g} (float32's largest), got {weight}"
        )
    return weight


def validate_predictor(
    y: object,
    dictionary: object,
    intercept: object,
    pixel_labels: object,
    image_labels: object,
    local_weight: object,
    global_weight: object,
    *,
    check_ranges: bool = True,
) -> tuple[float, float]:
    """Returns local_weight and global_weight."""
    y = check_feature_map("y", y)
    n, _, h, w = y.shape
    if n * h * w == 0:
        # Both terms are means over pixels: with none there is no loss to take.
        raise ValueError(
            f"y must have at least one pixel (N*H*W > 0), got shape {tuple(y.shape)}"
        )
    dictionary = check_dictionary(dictionary, y.shape[1], feature_name="y")
    intercept = check_intercept(intercept)
    check_same_dtype_device(y=y, dictionary=dictionary, intercept=intercept)
    check_labels(
        pixel_labels, image_labels, y, dictionary.shape[1], check_ranges=check_ranges
    )
    return (
        check_loss_weight("local_weight", local_weight),
        check_loss_weight("global_weight", global_weight),
    )
