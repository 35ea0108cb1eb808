"""GaLore's gradient projection: a rank-r orthonormal factor from the gradient's SVD, refreshed periodically,
optionally stored quantized and refreshed lazily (Q-GaLore).

The projector itself holds only its configuration; everything that changes lives in a plain dict of
tensors and ints under `proj_*` keys (the optimizer's per-param state), so it is saved by the optimizer's
`state_dict()` and loads with `torch.load(weights_only=True)`.
"""

from typing import Any

import torch
import torch.nn.functional as F

from galore_torch.factor_quant import dequantize_factor, quantize_factor

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
# (left factor U_r, right factor Vh_r, r x r rotations): None where the side is not projected
Factors = tuple[torch.Tensor | None, torch.Tensor | None]


def projected_sides(shape: torch.Size, proj_type: str) -> tuple[bool, bool]:
    """(left, right): which sides of an m x n gradient are projected. std projects the smaller side (right
    for m >= n), reverse_std the larger, full both."""
    m, n = shape
    if proj_type == "std":
        return (m < n, m >= n)
    if proj_type == "reverse_std":
        return (m >= n, m < n)
    return {"right": (False, True), "left": (True, False), "full": (True, True)}[proj_type]


class GaLoreProjector:
    """The projection of one m x n parameter's gradient.

    `project(grad, state)` recomputes the factor(s) from `torch.linalg.svd(grad)` when the count of projections
    so far is 0 mod the current gap (so at the first call), then returns the rank-r gradient: G P^T with
    P = Vh[:r] (right), U[:, :r]^T G (left), or U_r^T G Vh_r^T (full). `project_back(low, state)` maps a
    rank-r tensor back and multiplies it by `scale`. The side is fixed from the shape and `proj_type` at
    construction (the reference re-derives it in project_back from the rank-r tensor's shape, which breaks
    for r >= min(m, n); such ranks are refused here).

    Q-GaLore (`quant=True`): factors are stored as `quant_n_bit` asymmetric min-max codes in groups of
    `quant_group_size` and dequantized at use; at each recomputation the cosine similarity of the new and the
    previous leading singular vector is queued (`queue_size` long) and, once the queue is full and its mean is
    >= `cos_threshold`, the gap is multiplied by `gamma_proj` (int), so stable subspaces are recomputed less
    often. Reading the queue's mean is a host sync, made only at recomputation steps (the SVD syncs anyway).

    variant="corrected" also returns, at a recomputation, the r x r rotations between the old and new
    subspaces (see `project`), and compares leading vectors up to sign (|cos|: an SVD's signs are arbitrary).
    The SVD runs in float32 (float64 for float64 gradients); factors are stored in the gradient's dtype.
    """

    def __init__(self, shape: torch.Size, rank: int, *, proj_type: str = "std", scale: float = 1.0,
                 update_proj_gap: int = 200, quant: bool = False, quant_n_bit: int = 8, quant_group_size: int = 256,
                 cos_threshold: float = 1.0, gamma_proj: float = 2.0, queue_size: int = 5,
                 variant: str = "reference"):
        validate_projection(shape, rank, proj_type, update_proj_gap, quant_n_bit, quant_group_size, queue_size)
        self.shape, self.rank, self.scale, self.update_proj_gap = torch.Size(shape), rank, scale, update_proj_gap
        self.left, self.right = projected_sides(self.shape, proj_type)
        self.quant, self.quant_n_bit, self.quant_group_size = quant, quant_n_bit, quant_group_size
        self.cos_threshold, self.gamma_proj, self.queue_size = cos_threshold, gamma_proj, queue_size
        self.corrected = variant == "corrected"

    @property
    def low_shape(self) -> torch.Size:
        m, n = self.shape
        return torch.Size((self.rank if self.left else m, self.rank if self.right else n))

    def init_state(self, state: dict[str, Any], device: torch.device) -> None:
        """The counters (and Q-GaLore's queue, on `device`); the factors come with the first `project`."""
        state["proj_step"] = 0  # projections made so far
        state["proj_gap"] = self.update_proj_gap  # current recomputation period (Q-GaLore grows it)
        state["proj_svd_step"] = 0  # proj_step of the last recomputation
        if self.quant:
            state["proj_queue"] = torch.zeros(self.queue_size, dtype=torch.float32, device=device)
            state["proj_queue_len"] = 0

    def project(self, grad: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, Factors | None]:
        """(rank-r gradient, rotations). Rotations are None except at a recomputation under
        variant="corrected": then (R_left, R_right) with R_left = U_new^T U_old and R_right = Vh_new Vh_old^T,
        so that a rank-r tensor X of the old subspace reads R_left X R_right^T in the new one."""
        if "proj_step" not in state:
            self.init_state(state, grad.device)
        step = state["proj_step"]
        rotations = None
        if step % state["proj_gap"] == 0:
            old = self.factors(state, grad.dtype) if step > 0 else None
            new = self._svd(grad)
            if old is not None and self.corrected:
                rotations = tuple(None if n is None else _rotation(n, o, left=side)
                                  for n, o, side in zip(new, old, (True, False)))
            if self.quant:
                self._lazy_update(state, new)
            self._store(state, new)
            state["proj_svd_step"] = step
        state["proj_step"] = step + 1
        left, right = self.factors(state, grad.dtype)
        low = grad
        if left is not None:
            low = left.t() @ low
        if right is not None:
            low = low @ right.t()
        return low, rotations

    def project_back(self, low: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """scale * (U_r low, low Vh_r or U_r low Vh_r), in `low`'s dtype."""
        left, right = self.factors(state, low.dtype)
        full = low
        if left is not None:
            full = left @ full
        if right is not None:
            full = full @ right
        return full * self.scale

    def factors(self, state: dict[str, Any], dtype: torch.dtype) -> Factors:
        """(U_r, Vh_r) in `dtype` (dequantized under Q-GaLore), None for a side not projected."""
        return tuple(self._factor(state, name, dtype) if on else None
                     for name, on in (("left", self.left), ("right", self.right)))

    def _factor(self, state: dict[str, Any], name: str, dtype: torch.dtype) -> torch.Tensor:
        if not self.quant:
            return state[f"proj_{name}"].to(dtype)
        m, n = self.shape
        shape = torch.Size((m, self.rank) if name == "left" else (self.rank, n))
        return dequantize_factor(state[f"proj_{name}_codes"], state[f"proj_{name}_scales"],
                                 state[f"proj_{name}_minima"], shape, dtype)

    def _svd(self, grad: torch.Tensor) -> Factors:
        """(U[:, :r], Vh[:r]) of the gradient, in its dtype; None for a side not projected."""
        matrix = grad.detach().to(torch.promote_types(grad.dtype, torch.float32))
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return (u[:, :self.rank].to(grad.dtype).contiguous() if self.left else None,
                vh[:self.rank].to(grad.dtype).contiguous() if self.right else None)

    def _store(self, state: dict[str, Any], factors: Factors) -> None:
        for name, factor in zip(("left", "right"), factors):
            if factor is None:
                continue
            if self.quant:
                codes, scales, minima = quantize_factor(factor, self.quant_n_bit, self.quant_group_size)
                state[f"proj_{name}_codes"], state[f"proj_{name}_scales"] = codes, scales
                state[f"proj_{name}_minima"] = minima
            else:
                state[f"proj_{name}"] = factor

    def _lazy_update(self, state: dict[str, Any], new: Factors) -> None:
        """Queue the cosine similarity of the leading singular vectors (the right factor's when there is one,
        as the reference's first row of the r x n factor), and grow the gap when the queue says the subspace is
        stable. The previous vector is kept unquantized (one row, not the factor)."""
        left, right = new
        leading = (right[0] if right is not None else left[:, 0]).float()
        if "proj_leading" in state:
            cos = F.cosine_similarity(leading, state["proj_leading"], dim=0)
            if self.corrected:
                cos = cos.abs()
            queue, count = state["proj_queue"], state["proj_queue_len"]
            if count == self.queue_size:
                queue = torch.cat([queue[1:], cos.reshape(1)])
            else:
                queue = queue.clone()
                queue[count] = cos
                state["proj_queue_len"] = count + 1
            state["proj_queue"] = queue
            if state["proj_queue_len"] == self.queue_size and queue.mean().item() >= self.cos_threshold:
                state["proj_gap"] = int(state["proj_gap"] * self.gamma_proj)
        state["proj_leading"] = leading


def _rotation(new: torch.Tensor, old: torch.Tensor, *, left: bool) -> torch.Tensor:
    """r x r map from old to new subspace coordinates: U_new^T U_old (left) or Vh_new Vh_old^T (right)."""
    return new.t() @ old if left else new @ old.t()


def validate_projection(shape: torch.Size, rank: int, proj_type: str, update_proj_gap: int, quant_n_bit: int,
                        quant_group_size: int, queue_size: int) -> None:
    """One-line ValueErrors naming the bad setting and its fix."""
    if len(shape) != 2:
        raise ValueError(f"GaLore projects 2-D weights only; a parameter of shape {tuple(shape)} is in a group with "
                         "rank: move it to a plain param group")
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"invalid proj_type (--proj_type): {proj_type!r}; choose one of {', '.join(PROJ_TYPES)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank < min(shape):
        raise ValueError(f"invalid rank (--rank) {rank!r} for a parameter of shape {tuple(shape)}: must be an int "
                         f"in [1, {min(shape) - 1}] (below min(m, n) = {min(shape)}); lower --rank")
    if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap < 1:
        raise ValueError(f"invalid update_proj_gap (--update_proj_gap) {update_proj_gap!r}: must be an int >= 1 "
                         "(steps between SVD recomputations)")
    if quant_n_bit not in (4, 8):
        raise ValueError(f"invalid quant_n_bit (--proj_bits) {quant_n_bit!r}: choose 4 or 8")
    if isinstance(quant_group_size, bool) or not isinstance(quant_group_size, int) or quant_group_size < 1:
        raise ValueError(f"invalid quant_group_size (--proj_group_size) {quant_group_size!r}: must be an int >= 1")
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError(f"invalid queue_size (--queue_size) {queue_size!r}: must be an int >= 1")
