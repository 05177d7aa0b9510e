"""Block quantization of MatMul weights for com.microsoft.MatMulNBits: grid detection, exact
transcoding of weights already on a 4/8-bit block grid, and re-quantization of the rest.

A weight W [K, N] (ONNX MatMul layout, y = x @ W) is quantized per output column in blocks of
`block` consecutive inputs. MatMulNBits without zero points computes w = (k - mid) * scale with
k in 0 .. 2**bits - 1 and mid = 2**(bits - 1) (ONNX Runtime's default zero point).

Three storage forms ("zero-point kinds"):
  none    w = (k - mid) * scale: symmetric grids (GGUF Q8_0, Q4_0) store exactly, the rest rounds.
  uint8   w = (k - z) * scale with an integer z per block (packed like the weights).
  offset  w = (k - mid) * scale + c, c a float per block, applied as a second, tiny MatMul:
          y = MatMulNBits(x) + blocksum(x) @ C, blocksum(x) [.., K / block]. An affine grid
          (GGUF Q4_1, every 32-weight sub-block of Q4_K: w = d * q + m) stores exactly this way.
MatMulNBits also takes float zero points (w = (k - z) * scale, z float), the same arithmetic as
`offset`, but ONNX Runtime's CPU kernel has no fast path for them: measured 939 us vs 14 us per
call (576 x 1536, one thread, accuracy_level 4), and 8-bit float zero points are refused on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
# Relative tolerance (of a block's largest magnitude) within which a reconstructed weight counts as
# exact: the GGUF dequantizer rounds d * q and then + m in fp32 (2 ulp), our scale / offset once more.
EXACT_ULPS = 8


@dataclass
class Quantized:
    """One weight in MatMulNBits form: codes [N, nb, block] (0 .. 2**bits - 1), scales [N, nb],
    plus zero points [N, nb] (uint8 form) or offsets [N, nb] (offset form)."""

    bits: int
    block: int
    k: int  # input size (unpadded)
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None = None
    offsets: np.ndarray | None = None
    exact_blocks: int = 0  # blocks stored exactly (transcoded from a grid found in the weight)
    max_abs_error: float = 0.0  # largest |dequantized - original| over the tensor
    rel_rms_error: float = 0.0  # rms(dequantized - original) / rms(original)

    @property
    def kind(self) -> str:
        return "offset" if self.offsets is not None else "uint8" if self.zero_points is not None else "none"

    @property
    def blocks(self) -> int:
        return int(self.scales.size)

    def dequantize(self) -> np.ndarray:
        """The weight this stores, W [K, N] float32, computed as ONNX Runtime computes it."""
        mid = 1 << (self.bits - 1)
        zp = self.zero_points.astype(np.float32) if self.zero_points is not None else np.float32(mid)
        if np.ndim(zp):
            zp = zp[..., None]
        w = (self.codes.astype(np.float32) - zp) * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        n = w.shape[0]
        return np.ascontiguousarray(w.reshape(n, -1)[:, : self.k].T)


def blocks_of(weight: np.ndarray, block: int) -> np.ndarray:
    """W [K, N] -> [N, nb, block] float64, the last block zero-padded."""
    k, n = weight.shape
    nb = -(-k // block)
    wt = np.zeros((n, nb * block), np.float64)
    wt[:, :k] = weight.T
    return wt.reshape(n, nb, block)


def _tolerance(wb: np.ndarray) -> np.ndarray:
    return EXACT_ULPS * EPS32 * np.maximum(np.abs(wb).max(-1), np.finfo(np.float32).tiny)


def _few_values(wb: np.ndarray, levels: int, tol: np.ndarray) -> np.ndarray:
    """Blocks whose values fall in at most `levels` clusters (sorted neighbours further apart than 2 tol start a
    new one): a block on a grid of `levels` codes has no more, so the others need no grid search. A bf16 weight's
    blocks have 32 distinct values and skip the search (an 8B model's export: most of its rounding time)."""
    gaps = np.diff(np.sort(wb, axis=-1), axis=-1) > 2 * tol[..., None]
    return gaps.sum(-1) + 1 <= levels


def affine_grid(wb: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Blocks [..., block] that are an affine grid base + j * step with j in 0 .. levels - 1.

    Returns (on_grid [...], codes j, step, base). Tries the widest grid first (a GGUF Q4_1 block uses
    its minimum and maximum as codes 0 and 15), then narrower ones for blocks that use fewer codes."""
    lo, hi = wb.min(-1), wb.max(-1)
    span = hi - lo
    tol = _tolerance(wb)
    codes = np.zeros(wb.shape, np.int64)
    step = np.ones(lo.shape)
    found = span <= tol  # constant block: code 0, any step
    candidate = _few_values(wb, levels, tol)
    for n_steps in range(levels - 1, 0, -1):
        todo = ~found & candidate
        if not todo.any():
            break
        s = span[todo] / n_steps
        j = np.rint((wb[todo] - lo[todo, None]) / s[:, None])
        good = (np.abs(lo[todo, None] + j * s[:, None] - wb[todo]) <= tol[todo, None]).all(-1)
        idx = tuple(a[good] for a in np.nonzero(todo))
        codes[idx], step[idx] = j[good], s[good]
        found[idx] = True
    return found, codes, step, lo


def symmetric_grid(wb: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks that are step * j with integer j in -half .. half - 1 (GGUF Q8_0: amax -> +-127; Q4_0:
    the largest magnitude -> -8, so the step may be negative).

    Returns (on_grid, codes j, step)."""
    amax = np.abs(wb).max(-1)
    tol = _tolerance(wb)
    found = amax <= tol
    candidate = _few_values(wb, 2 * half, tol)
    codes = np.zeros(wb.shape, np.int64)
    step = np.ones(amax.shape)
    for top in (half - 1, half):  # the largest magnitude is code +-127 or -128
        todo = ~found & candidate
        if not todo.any():
            break
        s = amax[todo] / top
        j = np.rint(wb[todo] / s[:, None])
        on = (np.abs(j * s[:, None] - wb[todo]) <= tol[todo, None]).all(-1)
        fits = (j >= -half).all(-1) & (j <= half - 1).all(-1)
        flipped = ~fits & (-j >= -half).all(-1) & (-j <= half - 1).all(-1)  # Q4_0: largest magnitude at code 0
        j = np.where(flipped[:, None], -j, j)
        s = np.where(flipped, -s, s)
        good = on & (fits | flipped)
        idx = tuple(a[good] for a in np.nonzero(todo))
        codes[idx], step[idx] = j[good], s[good]
        found[idx] = True
    return found, codes, step


# --------------------------------------------------------------------------- re-quantization


def _fit_affine(wb: np.ndarray, levels: int, weights: np.ndarray | None, rounds: int = 3):
    """Least-squares affine fit per block: start from min/max and a few shrunken ranges, then alternate
    code assignment and a (weighted) linear fit of base + step * j (as llama.cpp's k-quants do).

    `weights` [..., block] weight each input's error (calibration: mean x**2 of that input)."""
    w = np.ones_like(wb) if weights is None else np.broadcast_to(weights, wb.shape)
    lo0, hi0 = wb.min(-1), wb.max(-1)
    best = None
    for shrink in (0.0, 0.05, 0.1):
        lo = lo0 + shrink * (hi0 - lo0) / 2
        hi = hi0 - shrink * (hi0 - lo0) / 2
        step = np.maximum((hi - lo) / (levels - 1), 1e-30)
        base = lo
        for _ in range(rounds):
            j = np.clip(np.rint((wb - base[..., None]) / step[..., None]), 0, levels - 1)
            sw, sj, sv = w.sum(-1), (w * j).sum(-1), (w * wb).sum(-1)
            sjj, sjv = (w * j * j).sum(-1), (w * j * wb).sum(-1)
            det = sw * sjj - sj * sj
            ok = det > 1e-30
            new_step = np.where(ok, (sw * sjv - sj * sv) / np.where(ok, det, 1), step)
            new_base = np.where(ok, (sv - new_step * sj) / np.where(ok, sw, 1), base)
            good = new_step > 0
            step, base = np.where(good, new_step, step), np.where(good, new_base, base)
        j = np.clip(np.rint((wb - base[..., None]) / step[..., None]), 0, levels - 1)
        err = (w * (base[..., None] + step[..., None] * j - wb) ** 2).sum(-1)
        if best is None:
            best = [err, j, step, base]
        else:
            better = err < best[0]
            best[0] = np.where(better, err, best[0])
            best[1] = np.where(better[..., None], j, best[1])
            best[2] = np.where(better, step, best[2])
            best[3] = np.where(better, base, best[3])
    return best[1], best[2], best[3]


def _fit_symmetric(wb: np.ndarray, bits: int, weights: np.ndarray | None):
    """Round-to-nearest on the symmetric grid whose scale maps the block's largest-magnitude weight to
    code -mid (all 2**bits codes in use, as onnxruntime's quantizer does), or a slightly smaller
    scale, whichever has less (weighted) squared error."""
    mid = 1 << (bits - 1)
    w = np.ones_like(wb) if weights is None else np.broadcast_to(weights, wb.shape)
    signed = np.take_along_axis(wb, np.abs(wb).argmax(-1)[..., None], -1)[..., 0]
    signed = np.where(np.abs(signed) > 1e-30, signed, 1e-30)
    best = None
    for factor in (1.0, 0.95, 0.9):
        step = signed * factor / -mid
        j = np.clip(np.rint(wb / step[..., None]), -mid, mid - 1)
        err = (w * (j * step[..., None] - wb) ** 2).sum(-1)
        if best is None:
            best = [err, j, step]
        else:
            better = err < best[0]
            best = [np.where(better, err, best[0]), np.where(better[..., None], j, best[1]),
                    np.where(better, step, best[2])]
    return best[1], best[2]


def quantize(weight: np.ndarray, bits: int, kind: str, *, block: int = 32, method: str = "fit",
             importance: np.ndarray | None = None, transcode: bool = True) -> Quantized:
    """Quantize W [K, N] into MatMulNBits form `kind` ("none", "uint8", "offset").

    Blocks already on a grid the form represents are stored exactly (`transcode`); the others are
    rounded by `method`: "rtn" (min/max or absmax round-to-nearest) or "fit" (least-squares grid fit,
    weighted by `importance` [K], the mean square of each input over calibration text, when given)."""
    if kind not in ("none", "uint8", "offset"):
        raise ValueError(f"unknown zero-point kind {kind!r}")
    k, _ = weight.shape
    wb = blocks_of(weight.astype(np.float32), block)
    levels, mid = 1 << bits, 1 << (bits - 1)
    imp = None
    if importance is not None and method == "fit":
        imp = np.zeros(wb.shape[1] * block)
        imp[:k] = np.maximum(importance, 1e-12)
        imp = imp.reshape(1, -1, block)
    codes = np.zeros(wb.shape, np.int64)
    scales = np.zeros(wb.shape[:2])
    zero_points = np.full(wb.shape[:2], mid, np.int64) if kind == "uint8" else None
    offsets = np.zeros(wb.shape[:2]) if kind == "offset" else None
    exact = np.zeros(wb.shape[:2], bool)

    if transcode:
        sym_ok, sym_j, sym_step = symmetric_grid(wb, mid)
        sym_step = _half_if_exact(sym_step, lambda step: sym_j * step[..., None], wb)
        codes[sym_ok], scales[sym_ok], exact[sym_ok] = sym_j[sym_ok] + mid, sym_step[sym_ok], True
        if kind != "none" and bits == 4:
            aff_ok, aff_j, aff_step, aff_base = affine_grid(wb, levels)
            aff_step = _half_if_exact(aff_step, lambda step: aff_base[..., None] + aff_j * step[..., None], wb)
            use = aff_ok & ~exact
            if kind == "offset":
                codes[use], scales[use] = aff_j[use], aff_step[use]
                offsets[use] = aff_base[use] + mid * aff_step[use]
                exact[use] = True
            else:  # an integer zero point stores the grid exactly when base / step is an integer
                z = -aff_base / np.where(aff_step > 0, aff_step, 1)
                whole = use & (np.abs(z - np.rint(z)) <= 1e-6) & (np.rint(z) >= 0) & (np.rint(z) <= levels - 1)
                zi = np.rint(z)
                codes[whole] = aff_j[whole]  # value = (j - z) * step
                scales[whole], zero_points[whole] = aff_step[whole], zi[whole]
                ok = (codes >= 0).all(-1) & (codes <= levels - 1).all(-1)
                exact[whole & ok] = True

    rest = ~exact
    if rest.any():
        sub = wb[rest]
        sub_imp = None if imp is None else np.broadcast_to(imp, wb.shape)[rest]
        if kind == "none":
            if method == "rtn":
                step = _rtn_symmetric_step(sub, mid)
                j = np.clip(np.rint(sub / step[:, None]), -mid, mid - 1)
            else:
                j, step = _fit_symmetric(sub, bits, sub_imp)
            codes[rest], scales[rest] = j + mid, step
        else:
            if method == "rtn":
                lo, hi = sub.min(-1), sub.max(-1)
                step = np.maximum((hi - lo) / (levels - 1), 1e-30)
                j = np.clip(np.rint((sub - lo[:, None]) / step[:, None]), 0, levels - 1)
                base = lo
            else:
                j, step, base = _fit_affine(sub, levels, sub_imp)
            if kind == "offset":
                codes[rest], scales[rest], offsets[rest] = j, step, base + mid * step
            else:
                z = np.clip(np.rint(-base / step), 0, levels - 1)
                j, step = _integer_zero_point(sub, step, z, levels, sub_imp, refine=method == "fit")
                if method == "fit":  # the min/max start can end better once the zero point is an integer
                    lo, hi = sub.min(-1), sub.max(-1)
                    step0 = np.maximum((hi - lo) / (levels - 1), 1e-30)
                    z0 = np.clip(np.rint(-lo / step0), 0, levels - 1)
                    j0, step0 = _integer_zero_point(sub, step0, z0, levels, sub_imp, refine=True)
                    w = np.ones_like(sub) if sub_imp is None else sub_imp
                    err = (w * ((j - z[:, None]) * step[:, None] - sub) ** 2).sum(-1)
                    err0 = (w * ((j0 - z0[:, None]) * step0[:, None] - sub) ** 2).sum(-1)
                    better = err0 < err
                    j, step, z = np.where(better[:, None], j0, j), np.where(better, step0, step), np.where(better, z0, z)
                codes[rest], scales[rest], zero_points[rest] = j, step, z

    q = Quantized(bits, block, k, codes.astype(np.uint8), scales.astype(np.float32),
                  zero_points.astype(np.uint8) if zero_points is not None else None,
                  offsets.astype(np.float32) if offsets is not None else None, int(exact.sum()))
    return _with_errors(q, weight)


def _half_if_exact(step: np.ndarray, rebuild, wb: np.ndarray) -> np.ndarray:
    """`step` rounded to fp16 in the blocks that `rebuild(step)` still reproduces within the exactness
    tolerance. GGUF stores its block scales in fp16, so a transcoded step is one up to the dequantizer's fp32
    rounding; snapped back, the export can store it in half the bytes (weight_only keeps such tensors fp16)."""
    half = step.astype(np.float16).astype(np.float64)
    usable = np.isfinite(half) & (half != 0)
    fits = (np.abs(rebuild(np.where(usable, half, step)) - wb) <= _tolerance(wb)[..., None]).all(-1)
    return np.where(usable & fits, half, step)


def _with_errors(q: Quantized, weight: np.ndarray) -> Quantized:
    """`q` with its largest and relative rms error against the original weight filled in."""
    diff = q.dequantize().astype(np.float64) - weight
    q.max_abs_error = float(np.abs(diff).max())
    q.rel_rms_error = float(np.sqrt((diff ** 2).mean() / max((weight.astype(np.float64) ** 2).mean(), 1e-30)))
    return q


def _integer_zero_point(sub, step, z, levels, weights, refine: bool, rounds: int = 3):
    """Codes for w ~ (j - z) * step with a fixed integer zero point z; with `refine`, alternate code
    assignment and the least-squares step for those codes."""
    w = np.ones_like(sub) if weights is None else weights
    for _ in range(rounds if refine else 0):
        j = np.clip(np.rint(sub / step[:, None]) + z[:, None], 0, levels - 1) - z[:, None]
        den = (w * j * j).sum(-1)
        new = np.where(den > 0, (w * j * sub).sum(-1) / np.where(den > 0, den, 1), step)
        step = np.where(new > 0, new, step)
    j = np.clip(np.rint(sub / step[:, None]) + z[:, None], 0, levels - 1)
    return j, step


def _rtn_symmetric_step(sub: np.ndarray, mid: int) -> np.ndarray:
    # onnxruntime's own symmetric 4-bit RTN: scale = signed absmax / -8, codes in -8 .. 7
    idx = np.abs(sub).argmax(-1)
    signed = np.take_along_axis(sub, idx[:, None], -1)[:, 0]
    step = signed / -mid
    return np.where(np.abs(step) > 1e-30, step, 1e-30)


def pack(q: Quantized) -> dict[str, np.ndarray]:
    """MatMulNBits inputs: B [N, nb, block * bits / 8] uint8, scales [N, nb], zero points packed
    like B ([N, ceil(nb * bits / 8)]) for the uint8 form, offsets C [nb, N] for the offset form."""
    n, nb, block = q.codes.shape
    if q.bits == 4:
        b = (q.codes[..., 0::2] | (q.codes[..., 1::2] << 4)).astype(np.uint8)
    else:
        b = q.codes
    out = {"B": np.ascontiguousarray(b), "scales": q.scales}
    if q.zero_points is not None:
        zp = q.zero_points
        if q.bits == 4:
            if nb % 2:
                zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
            zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
        out["zero_points"] = np.ascontiguousarray(zp)
    if q.offsets is not None:
        out["offsets"] = np.ascontiguousarray(q.offsets.T)
    return out


# --------------------------------------------------------------------------- calibration-aware (GPTQ style)


def quantize_gptq(weight: np.ndarray, bits: int, hessian: np.ndarray, *, block: int = 32,
                  damp: float = 0.01, symmetric: bool = False) -> Quantized:
    """Quantize W [K, N] (uint8 zero-point form, or with `symmetric` the form with no zero point) so that x @ W keeps its value on calibration inputs,
    not only W itself: inputs are rounded one at a time and each rounding error is spread over the
    inputs not yet rounded, along the inverse of H = sum x x^T (the GPTQ update). The inputs go in order of
    decreasing H_ii (the most active first, while the most inputs remain to absorb their error), and each
    block's scale and integer zero point are fitted (weighted by diag H) on the original weights first, since
    a block's inputs are no longer rounded together. On the 25% en+general SmolLM2 expert's down_proj
    (PyTorch, held-apart tune documents): top-1 0.917, KL 0.017 against 0.909, 0.020 in input order with
    each block fitted when reached; damp 0.1 instead of 0.01 was worse both ways. `damp` adds that share of
    mean(diag H) to the diagonal. `symmetric`: the zero point is 2**(bits-1) everywhere and not stored (what
    GatherBlockQuantized reads when the embedding shares the lm_head's weight)."""
    k, n = weight.shape
    levels = 1 << bits
    w = weight.astype(np.float64).copy()
    h = np.array(hessian, np.float64, copy=True)
    dead = np.diag(h) <= 0  # inputs never active in calibration: their weights cannot matter there
    h[dead, dead] = 1.0
    h += damp * float(np.mean(np.diag(h))) * np.eye(k)
    diag = np.diag(h)
    nb = -(-k // block)
    scales = np.zeros((n, nb))
    zero_points = np.zeros((n, nb), np.int64)
    for b in range(nb):
        r0, r1 = b * block, min(k, (b + 1) * block)
        sub = w[r0:r1].T
        imp = np.broadcast_to(diag[r0:r1], sub.shape)
        if symmetric:
            _, step = _fit_symmetric(sub, bits, imp)
            z = np.full(n, levels // 2)
        else:
            _, step, base = _fit_affine(sub, levels, imp)
            z = np.clip(np.rint(-base / step), 0, levels - 1)
            _, step = _integer_zero_point(sub, step, z, levels, imp, refine=True)
        scales[:, b], zero_points[:, b] = step, z
    order = np.argsort(-diag, kind="stable")
    h = h[np.ix_(order, order)]
    # upper Cholesky factor of H^-1 (in rounding order): row i holds how input i's error spreads over the later ones
    u = _upper_cholesky_of_inverse(h)
    w = w[order]
    codes = np.zeros((n, nb * block), np.int64)
    codes[:, k:] = zero_points[:, -1:]  # padding inputs decode to zero
    for c0 in range(0, k, block):  # errors within a chunk of 32 first, then onto every later input at once
        c1 = min(k, c0 + block)
        err = np.zeros((c1 - c0, n))
        for i in range(c0, c1):
            step, z = scales[:, order[i] // block], zero_points[:, order[i] // block]
            j = np.clip(np.rint(w[i] / step) + z, 0, levels - 1)
            e = (w[i] - (j - z) * step) / u[i, i]
            w[i + 1:c1] -= np.outer(u[i, i + 1:c1], e)
            err[i - c0] = e
            codes[:, order[i]] = j
        w[c1:] -= u[c0:c1, c1:].T @ err
    q = Quantized(bits, block, k, codes.reshape(n, nb, block).astype(np.uint8), scales.astype(np.float32),
                  None if symmetric else zero_points.astype(np.uint8))
    return _with_errors(q, weight)


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """U upper triangular with U^T U = H^-1 (float64), through H's Cholesky factor: about K^3 operations where
    inverting with general solves took 5 K^3 (a 1B model's 8,192-wide down_proj: 50 s instead of 115 s here)."""
    import torch

    lower = torch.linalg.cholesky(torch.from_numpy(h))
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).numpy()


def output_error(weight: np.ndarray, q: Quantized, hessian: np.ndarray) -> float:
    """Relative output error on calibration inputs: tr(D^T H D) / tr(W^T H W), D = dequantized - W."""
    d = q.dequantize().astype(np.float64) - weight
    w = weight.astype(np.float64)
    # (H @ D) * D summed: two matrix products, not einsum's triple loop (minutes on a 49k-row lm_head)
    return float(np.sqrt(((hessian @ d) * d).sum() / max(((hessian @ w) * w).sum(), 1e-30)))
