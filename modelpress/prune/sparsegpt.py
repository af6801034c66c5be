"""SparseGPT-style one-shot unstructured pruning.

Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot".
For a layer ``y = W x`` and calibration inputs ``X``, the layer-wise problem is
``min ||W X - W' X||^2`` subject to a sparsity mask on ``W'`` (Sec. 3, eq. 1). Its Hessian is
``H = 2 X X^T`` (shared by all rows). SparseGPT visits the columns left to right (Algorithm 1): a column's
pruned weights are zeroed and the error ``(w - q) / [H^-1]_jj`` is spread over the not-yet-visited columns
with the row ``[H^-1]_{j, j:}`` of the upper Cholesky factor of ``H^-1`` (the OBS update, eq. 3, made cheap by
the Cholesky trick of Sec. 3.3). The mask is chosen adaptively per block of ``blocksize`` columns by the OBS
saliency ``w^2 / [H^-1]_jj^2`` (Sec. 3.4, "adaptive mask selection").

Here the Hessian of every selected layer is collected in one forward pass over calibration data through the
*dense* model (:func:`modelpress.data.capture.collect_hessians`, shared with GPTQ and Delta-CoMe); EvoPress' level database needs many levels of the same layer, and
each level is computed from the same dense inputs.
"""
from __future__ import annotations

import torch

from ..quant.gptq import _inverse_cholesky  # the upper Cholesky factor of (H + lambda I)^-1, shared with GPTQ


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, blocksize: int = 128,
                    percdamp: float = 0.01) -> torch.Tensor:
    """Prune ``W`` ``[rows, cols]`` to unstructured ``sparsity`` with SparseGPT (Algorithm 1).

    ``H`` is the ``[cols, cols]`` input Hessian ``2 X X^T / n``. Returns a new tensor of ``W``'s dtype in which
    exactly ``floor(sparsity * rows * cols)`` weights are zero, chosen per block of ``blocksize`` columns by
    least OBS saliency, and the surviving weights are updated to compensate for them.
    """
    return sparsegpt_prune_levels(W, H, [sparsity], blocksize, percdamp)[0]


@torch.no_grad()
def sparsegpt_prune_levels(W: torch.Tensor, H: torch.Tensor, sparsities: list[float], blocksize: int = 128,
                           percdamp: float = 0.01) -> list[torch.Tensor]:
    """:func:`sparsegpt_prune` at several sparsities at once (one result per entry of ``sparsities``).

    The OBS update is row-wise and every level shares ``H``, so the levels' copies of ``W`` are stacked
    into one ``[levels * rows, cols]`` matrix and visited column by column together; only the mask is chosen
    per level (each level's own block). Same results as separate calls, a fraction of the Python overhead.
    """
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {s}")
    rows, cols = W.shape
    todo = [i for i, s in enumerate(sparsities) if s > 0.0]
    out: list[torch.Tensor] = [W.detach().clone() for _ in sparsities]
    if not todo:
        return out
    Hd = H.detach().to(torch.float64).clone()
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1.0
    Hinv = _inverse_cholesky(Hd, percdamp)  # dampening lambda = percdamp * mean(diag H), as in GPTQ
    Wf = W.detach().to(torch.float64).repeat(len(todo), 1)
    Wf[:, dead] = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wf[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        d = torch.diag(Hinv1)
        prune = torch.zeros_like(W1, dtype=torch.bool)
        for n, li in enumerate(todo):  # adaptive mask selection, per level, on this block
            sl = slice(n * rows, (n + 1) * rows)
            saliency = W1[sl] ** 2 / d.unsqueeze(0) ** 2
            s = sparsities[li]
            k = int(rows * i2 * s) - int(rows * i1 * s)  # cumulative: exact overall count
            if k > 0:
                idx = torch.argsort(saliency.flatten(), stable=True)[:k]
                prune[sl].view(-1)[idx] = True
        for i in range(i2 - i1):
            w = W1[:, i]
            q = torch.where(prune[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        Wf[:, i1:i2] = W1
        Wf[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    for n, li in enumerate(todo):
        out[li] = Wf[n * rows:(n + 1) * rows].to(W.dtype)
    return out


def magnitude_prune(W: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``floor(sparsity * numel)`` weights of least magnitude over the whole matrix (per layer)."""
    out = W.detach().clone()
    k = int(out.numel() * sparsity)
    if k > 0:
        idx = torch.argsort(out.abs().flatten(), stable=True)[:k]
        out.view(-1)[idx] = 0
    return out


def layer_output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T) / 2`` = mean squared output error of the layer over the calibration rows."""
    D = (W.to(torch.float64) - Wq.to(torch.float64)).reshape(W.shape[0], -1)
    return float(torch.einsum("ij,jk,ik->", D, H.to(torch.float64), D) / 2)
