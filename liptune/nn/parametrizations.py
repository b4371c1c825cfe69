r"""Weight parametrisations that make a linear map 1-Lipschitz.

Each class is an ``nn.Module`` for :func:`torch.nn.utils.parametrize.register_parametrization`:
it maps the free parameter ``weight`` to a constrained weight, differentiably.

In training mode the constrained weight is recomputed at every access (it follows the
optimizer). In eval mode it is computed once and cached: the cache is dropped when the module
goes back to ``train()``, when ``load_state_dict`` loads into it, and whenever the free weight
or a buffer differs in value from what the cache was computed from (an optimizer step, a
``copy_``, an edit through ``.data``): each eval access compares them (one pass over the
weight, far cheaper than the constraint; on an accelerator it reads one flag back).

Float16/bfloat16 weights are constrained in float32 and the result cast back.
"""

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from liptune.nn._validation import positive_finite, positive_int

__all__ = [
    "BjorckSpectral",
    "CachedParametrization",
    "FrobeniusNormalized",
    "QROrthogonal",
    "bjorck_orthonormalize",
]

_BJORCK_SAFE_RATIO = 1.7


def bjorck_orthonormalize(weight: Tensor, iterations: int, tolerance: float) -> Tensor:
    r"""Push the singular values of a 2-D ``weight`` towards 1 by Björck's iteration.

    .. math:: W_{k+1} = \tfrac32 W_k - \tfrac12 W_k W_k^\top W_k

    maps each singular value :math:`s \in (0, \sqrt 3)` by :math:`s \mapsto 1.5 s - 0.5 s^3`,
    which converges to 1. After at least one step, the loop stops before ``iterations`` once
    :math:`\|W W^\top - I\|_F <` ``tolerance`` when ``weight`` is on the CPU; on other devices
    all ``iterations`` steps run, since the test would synchronise the device with the host.
    Since :math:`1.5 s - 0.5 s^3 \le 1` for every :math:`s \ge 0`, one step already bounds all
    singular values by 1; the tolerance only decides how close to 1 the small ones get.

    The iteration runs on the Gram matrix of the smaller side: with
    :math:`G_k = W_k W_k^\top` and :math:`A_k = \tfrac32 I - \tfrac12 G_k`,
    :math:`W_{k+1} = A_k W_k`, so :math:`W_k = P_k W_0` with :math:`P_{k+1} = A_k P_k` and
    :math:`G_{k+1} = A_k G_k A_k`. Each step costs three products of ``(m, m)`` matrices,
    ``m = min(out, in)``, instead of two ``(m, m) x (m, n)`` ones.
    """
    wide = weight.shape[0] <= weight.shape[1]
    w = weight if wide else weight.mT
    eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    gram = w @ w.mT
    polynomial = None
    # Reading the residual is a host synchronisation: free on the CPU, a stall of the whole
    # queue on an accelerator, where the remaining steps cost less than the wait.
    early_stop = w.device.type == "cpu"
    for step in range(iterations):
        if early_stop and step > 0 and torch.linalg.matrix_norm(gram.detach() - eye) < tolerance:
            break
        factor = torch.add(1.5 * eye, gram, alpha=-0.5)
        polynomial = factor if polynomial is None else factor @ polynomial
        gram = factor @ gram @ factor
    if polynomial is None:
        return weight
    # P_k is a polynomial in the symmetric G_0, hence symmetric: for a tall weight
    # (P W^T)^T = W P, which comes out contiguous (a transposed result would make the
    # convolutions that use it copy or take slower paths).
    return polynomial @ weight if wide else weight @ polynomial


def _without_autocast(device_type: str) -> contextlib.AbstractContextManager[object]:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class CachedParametrization(nn.Module):
    """Base class: caches the constrained weight in eval mode.

    Subclasses implement :meth:`constrain`.

    Each eval-mode access checks the cache by value against the free weight and the buffers
    (``torch.equal``, one per tensor), so an edit through ``.data``, which bumps no version
    counter, is never served a stale constrained weight. On an accelerator each check reads
    one flag back to the host: one synchronisation per tensor per layer per eval batch, only in
    eval passes (training-mode accesses recompute and never check). For the Fashion-MNIST
    reference trial (4 constrained layers, a 6,000-image validation split in 3 batches of
    2,048) that is 24 reads per validation pass, each a host round trip (tens of microseconds)
    after the layer's queued kernels: small against the 1 s epoch the GPU target allows, so the
    guarantee is kept rather than the check skipped (not yet timed on a GPU).
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: Tensor | None = None
        self._cache_key: tuple[Tensor, ...] | None = None

    def constrain(self, weight: Tensor) -> Tensor:
        """Map the free ``weight`` to the constrained weight (differentiable)."""
        raise NotImplementedError

    def _state(self, weight: Tensor) -> tuple[Tensor, ...]:
        return (weight, *self.buffers(recurse=False))

    def _cache_valid(self, weight: Tensor) -> bool:
        if self._cache is None or self._cache_key is None:
            return False
        # Compared by value: an in-place edit through ``.data`` bumps no version counter.
        return len(self._cache_key) == len(self._state(weight)) and all(
            t.shape == c.shape and t.dtype == c.dtype and t.device == c.device and torch.equal(t, c)
            for t, c in zip(self._state(weight), self._cache_key, strict=True)
        )

    def forward(self, weight: Tensor) -> Tensor:
        # The constraint is computed in float32 at least, whatever the weight's dtype and any
        # autocast: a float16/bfloat16 Björck iteration leaves singular values visibly above 1.
        with _without_autocast(weight.device.type):
            if self.training:
                self._cache = None
                return self._constrain_wide(weight)
            if not self._cache_valid(weight):
                with torch.no_grad():
                    self._cache = self._constrain_wide(weight)
                self._cache_key = tuple(t.detach().clone() for t in self._state(weight))
            assert self._cache is not None  # _cache_valid holds, or it was just computed
            return self._cache

    def _constrain_wide(self, weight: Tensor) -> Tensor:
        if weight.dtype in (torch.float16, torch.bfloat16):
            return self.constrain(weight.float()).to(weight.dtype)
        return self.constrain(weight)

    def train(self, mode: bool = True) -> "CachedParametrization":
        self._cache = None
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = dict(state)
        state["_cache"] = None
        state["_cache_key"] = None
        return state


class BjorckSpectral(CachedParametrization):
    r"""Spectral normalisation by power iteration, then Björck orthonormalisation.

    The weight of shape ``(out, ...)`` is flattened to a matrix :math:`W` of shape
    ``(out, fan_in)``. The vectors ``u`` (``(out,)``) and ``v`` (``(fan_in,)``) of the power
    iteration persist as buffers (saved in the ``state_dict``) and are refined by
    ``power_iterations`` steps at each training-mode access, so that
    :math:`\sigma = u^\top W v` tracks the largest singular value of :math:`W`.
    The result is :math:`\mathrm{bjorck}(W / \sigma) \cdot` ``scale``, reshaped back.

    Args:
        weight: the initial free weight (sets the shapes and warms up ``u`` and ``v``).
        power_iterations: power-iteration steps per training-mode access, >= 1.
        bjorck_iterations: maximum Björck steps; 0 means spectral normalisation only, by the
            exact largest singular value (an SVD per access) rather than the power iteration.
        bjorck_tolerance: stop Björck once :math:`\|W W^\top - I\|_F` is below it.
        scale: a constant factor applied last (the conv layers' overlap bound).
    """

    u: Tensor
    v: Tensor

    def __init__(
        self,
        weight: Tensor,
        *,
        power_iterations: int = 1,
        bjorck_iterations: int = 15,
        bjorck_tolerance: float = 1e-4,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.power_iterations = positive_int("power_iterations", power_iterations)
        self.bjorck_iterations = positive_int("bjorck_iterations", bjorck_iterations, minimum=0)
        self.bjorck_tolerance = positive_finite("bjorck_tolerance", bjorck_tolerance)
        self.scale = positive_finite("scale", scale)
        matrix = weight.detach().reshape(weight.shape[0], -1)
        generator = torch.Generator(device="cpu").manual_seed(0)
        # Drawn on the CPU, where the generator is, whatever torch's default device.
        u = torch.randn(matrix.shape[0], generator=generator, dtype=matrix.dtype, device="cpu")
        v = torch.randn(matrix.shape[1], generator=generator, dtype=matrix.dtype, device="cpu")
        self.register_buffer("u", nn.functional.normalize(u, dim=0).to(matrix.device))
        self.register_buffer("v", nn.functional.normalize(v, dim=0).to(matrix.device))
        self._power_iterate(matrix, 20)

    @torch.no_grad()
    def _power_iterate(self, matrix: Tensor, iterations: int) -> None:
        u, v = self.u, self.v
        matrix = matrix.to(u.dtype)
        for _ in range(iterations):
            v = nn.functional.normalize(matrix.mT @ u, dim=0, out=v)
            u = nn.functional.normalize(matrix @ v, dim=0, out=u)

    def constrain(self, weight: Tensor) -> Tensor:
        matrix = weight.reshape(weight.shape[0], -1)
        if self.training:
            self._power_iterate(matrix.detach(), self.power_iterations)
        # Clones: a later training-mode access updates u and v in place while this graph lives.
        u, v = self.u.clone().to(matrix.dtype), self.v.clone().to(matrix.dtype)
        sigma = torch.dot(u, matrix @ v)
        if not self.bjorck_iterations:
            # Spectral normalisation only: the power-iteration value is a lower estimate with
            # no guard (stale after an overwrite, behind after optimizer steps); the exact
            # largest singular value guarantees ||W / sigma||_2 <= 1 (up to rounding).
            sigma = torch.linalg.matrix_norm(matrix, 2)
        else:
            # Björck diverges for singular values above sqrt(3). The power-iteration estimate
            # is a lower bound of the largest one; ||W||_F is an upper bound, so dividing by at
            # least ||W||_F / 1.7 keeps every singular value below 1.7 even when the
            # estimate is stale (e.g. after the weights were overwritten).
            sigma = torch.maximum(sigma, torch.linalg.matrix_norm(matrix) / _BJORCK_SAFE_RATIO)
        matrix = matrix / sigma
        if self.bjorck_iterations:
            matrix = bjorck_orthonormalize(matrix, self.bjorck_iterations, self.bjorck_tolerance)
        if self.scale != 1.0:
            matrix = matrix * self.scale
        return matrix.reshape(weight.shape)

    def extra_repr(self) -> str:
        return (
            f"power_iterations={self.power_iterations}, "
            f"bjorck_iterations={self.bjorck_iterations}, "
            f"bjorck_tolerance={self.bjorck_tolerance}, scale={self.scale:.4g}"
        )


class FrobeniusNormalized(CachedParametrization):
    r"""Divide the weight by its Frobenius norm, or each row by its own norm.

    Whole matrix: :math:`W / \|W\|_F`, so :math:`\|W\|_2 \le \|W\|_F = 1`.
    ``disjoint=True``: row :math:`i` becomes :math:`W_i / \|W_i\|_2`, so each output is
    separately 1-Lipschitz (the whole map is then only :math:`\sqrt{out}`-Lipschitz).
    """

    def __init__(self, *, disjoint: bool = False) -> None:
        super().__init__()
        self.disjoint = bool(disjoint)

    def constrain(self, weight: Tensor) -> Tensor:
        if self.disjoint:
            return weight / torch.linalg.vector_norm(weight, dim=1, keepdim=True)
        return weight / torch.linalg.vector_norm(weight)

    def extra_repr(self) -> str:
        return f"disjoint={self.disjoint}"


class QROrthogonal(CachedParametrization):
    r"""The orthonormal factor of the weight's QR decomposition (exactly orthogonal).

    For a weight of shape ``(out, in)`` with ``out >= in`` the result has orthonormal columns,
    otherwise orthonormal rows, so all its singular values are 1. Signs follow ``diag(R)`` so
    that the map is continuous and the identity on orthogonal weights.
    """

    def constrain(self, weight: Tensor) -> Tensor:
        tall = weight.shape[0] >= weight.shape[1]
        q, r = torch.linalg.qr(weight if tall else weight.mT)
        signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        q = q * signs
        return q if tall else q.mT
