"""Quantizer math as pure functions on tensors (no modules, no state).

Layout: a weight of shape (out, *rest) is viewed as rows of n = prod(rest) values and split into scale
groups by `as_groups`: (R, G, n_per_group) with R = 1 (tensor) or out, G = 1 or n / group_size. Scales,
zero points and codebooks are shaped (R, G) / (R, G, K); `from_groups` restores the weight shape.

Every quantizer has an `encode` (integer codes + parameters, no gradient) and its forward is computed
from the same codes with the same floating-point operations, so the dequantized parts reproduce the
fake-quantized weights bit for bit.
"""

from __future__ import annotations

import math

import torch

# ----------------------------------------------------------------------------------- autograd helpers


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _GradScale(torch.autograd.Function):
    """Identity forward (bit exact); multiplies the gradient by `scale` (LSQ's g)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class _SignSTE(torch.autograd.Function):
    """+1 for x >= 0, -1 otherwise; gradient passed where |x| <= clip (identity for clip=inf)."""

    @staticmethod
    def forward(ctx, x, clip: float):
        ctx.save_for_backward(x)
        ctx.clip = clip
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if math.isinf(ctx.clip):
            return g, None
        return g * (x.abs() <= ctx.clip).to(g.dtype), None


class _GatherSTE(torch.autograd.Function):
    """codebook lookup in forward; identity gradient to the weights (k-means STE)."""

    @staticmethod
    def forward(ctx, w, levels):
        return levels

    @staticmethod
    def backward(ctx, g):
        return g, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _GradScale.apply(x, float(scale))


def sign_ste(x: torch.Tensor, clip: float = math.inf) -> torch.Tensor:
    return _SignSTE.apply(x, float(clip))


# ----------------------------------------------------------------------------------- layout


def as_groups(w: torch.Tensor, granularity: str, group_size: int = 128) -> torch.Tensor:
    out = w.shape[0]
    if granularity == "tensor":
        return w.reshape(1, 1, -1)
    if granularity == "channel":
        return w.reshape(out, 1, -1)
    if granularity == "group":
        n = w[0].numel()
        if n % group_size:
            raise ValueError(f"group_size {group_size} does not divide row length {n}")
        return w.reshape(out, n // group_size, group_size)
    raise ValueError(f"unknown granularity {granularity}")


def from_groups(wg: torch.Tensor, shape) -> torch.Tensor:
    return wg.reshape(shape)


def signed_range(bits: int, narrow: bool = False) -> tuple[int, int]:
    """Integer code range: [-2^(b-1), 2^(b-1)-1], or the symmetric narrow range [-(2^(b-1)-1), 2^(b-1)-1]."""
    qp = 2 ** (bits - 1) - 1
    return (-qp if narrow else -qp - 1), qp


# ----------------------------------------------------------------------------------- round to nearest


def rtn_params(
    wg: torch.Tensor, bits: int, symmetric: bool = True, clip: str = "minmax", grid: int = 40
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale (R,G), zero_point (R,G) or None) for uniform round-to-nearest of grouped weights.

    symmetric: s = max|w| / (2^(b-1)-1) on the narrow range; asymmetric: s = (max-min)/(2^b-1),
    z = round(-min/s). clip='mse' shrinks the range by the ratio in (0.3, 1] that minimises the
    squared error of each group.
    """
    wg = wg.detach()
    tiny = torch.finfo(wg.dtype).tiny

    def params(ratio):
        if symmetric:
            _, qp = signed_range(bits, narrow=True)
            s = (wg.abs().amax(-1) * ratio / qp).clamp_min(tiny)
            return s, None
        lo = (wg.amin(-1) * ratio).clamp(max=0)
        hi = (wg.amax(-1) * ratio).clamp(min=0)
        s = ((hi - lo) / (2**bits - 1)).clamp_min(tiny)
        z = torch.round(-lo / s)
        return s, z

    if clip == "minmax":
        return params(1.0)
    best_s, best_z, best_err = None, None, None
    for i in range(grid):
        ratio = 1.0 - 0.7 * i / grid
        s, z = params(ratio)
        err = (rtn_fake(wg, s, z, bits) - wg).pow(2).sum(-1)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
        else:
            better = err < best_err
            best_s = torch.where(better, s, best_s)
            if z is not None:
                best_z = torch.where(better, z, best_z)
            best_err = torch.where(better, err, best_err)
    return best_s, best_z


def rtn_codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer codes (float dtype) of grouped weights; STE rounding and clamping (zero grad outside)."""
    s = scale.unsqueeze(-1)
    if zero is None:
        qn, qp = signed_range(bits, narrow=True)
        return round_ste(torch.clamp(wg / s, qn, qp))
    return round_ste(torch.clamp(wg / s + zero.unsqueeze(-1), 0, 2**bits - 1))


def rtn_dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    if zero is None:
        return codes * scale.unsqueeze(-1)
    return (codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


def rtn_fake(wg, scale, zero, bits):
    return rtn_dequant(rtn_codes(wg, scale, zero, bits), scale, zero)


# ----------------------------------------------------------------------------------- 1 bit


def binary_scale(wg: torch.Tensor) -> torch.Tensor:
    """mean |w| of each group (R, G); differentiable."""
    return wg.abs().mean(-1)


def binary_codes(wg: torch.Tensor, center: bool) -> torch.Tensor:
    """0/1 codes: w >= 0 (rtn) or w >= mean(w) of the group (BiT / BWN)."""
    x = wg - wg.mean(-1, keepdim=True) if center else wg
    return (x >= 0).to(wg.dtype)


def binary_fake(wg: torch.Tensor, scale: torch.Tensor, center: bool) -> torch.Tensor:
    """sign(w [- mean w]) * scale with an identity straight-through gradient."""
    x = wg - wg.mean(-1, keepdim=True) if center else wg
    return sign_ste(x) * scale.unsqueeze(-1)


def binary_dequant(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (2 * codes - 1) * scale.unsqueeze(-1)


# ----------------------------------------------------------------------------------- LSQ


def lsq_init_step(wg: torch.Tensor, bits: int) -> torch.Tensor:
    """2 mean|w| / sqrt(Qp) per group (Esser et al.)."""
    _, qp = signed_range(bits)
    return (2 * wg.detach().abs().mean(-1) / math.sqrt(qp)).clamp_min(1e-8)


def lsq_grad_scale(n: int, bits: int) -> float:
    """LSQ's g = 1/sqrt(N * Qp). The LSQ paper's N for a weight step is the layer's N_W; qspeech's default
    (quant.grad_scale_n=row) is the number of weights sharing the step: see lsq_grad_scale_n."""
    _, qp = signed_range(bits)
    return 1.0 / math.sqrt(n * qp)


def lsq_grad_scale_n(w: torch.Tensor, wg: torch.Tensor, how: str) -> int:
    """N of lsq_grad_scale for weight `w` grouped as `wg`: 'row' the weights sharing one step (a row, a group,
    or the tensor), 'layer' every weight of the tensor (N_W, Esser et al. section 2.2)."""
    if how == "row":
        return int(wg.shape[-1])
    if how == "layer":
        return int(w.numel())
    raise ValueError(f"unknown grad_scale_n {how!r} (row | layer)")


def lsq_codes(xg: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    return round_ste(torch.clamp(xg / step.unsqueeze(-1), qn, qp))


def lsq_fake(wg: torch.Tensor, step: torch.Tensor, bits: int, g: float | None = None) -> torch.Tensor:
    """q = round(clip(w/s, Qn, Qp)) * s; gradients: STE to w inside the range, LSQ's to s (scaled by g)."""
    qn, qp = signed_range(bits)
    if g is None:
        g = lsq_grad_scale(wg.shape[-1], bits)
    s = grad_scale(step, g)
    return lsq_codes(wg, s, qn, qp) * s.unsqueeze(-1)


# ----------------------------------------------------------------------------------- elastic activations (BiT)


def elastic_quant(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, bits: int, signed: bool,
                  g: float = 1.0) -> torch.Tensor:
    """BiT's elastic binarization / multi-bit quantization of activations (alpha > 0 learned scale,
    beta learned threshold/offset): signed 1 bit alpha*sign(x - beta); otherwise
    alpha*round(clip((x - beta)/alpha, Qn, Qp)) with Qn, Qp = 0, 1 (unsigned 1 bit), 0, 2^b-1 (unsigned)
    or the signed range. Straight-through gradients; alpha's scaled by g."""
    a = grad_scale(alpha, g)
    b = grad_scale(beta, g)
    v = (x - b) / a
    if bits == 1 and signed:
        return a * sign_ste(v, clip=1.0)
    if signed:
        qn, qp = signed_range(bits)
    else:
        qn, qp = 0, 2**bits - 1
    return a * round_ste(torch.clamp(v, qn, qp))


# ----------------------------------------------------------------------------------- BiT's code (bit_exact)
# Transcribed from facebookresearch/bit transformer/utils_quant.py (BwnQuantizer, ElasticQuantBinarizerSigned /
# Unsigned, AlphaInit): forward values and hand-written gradients as there, which differ from autograd through
# qspeech's formulas above (e.g. BiT's alpha gradient at 1 signed bit is sum(sign(x)), with no -v*1[|v|<=1] term).

BIT_ALPHA_EPS = 1e-5  # BiT: alpha = where(alpha > eps, alpha, eps)


class _BwnSTE(torch.autograd.Function):
    """sign(W - mean W) * mean|W| per group; the gradient reaches W unchanged (BiT's BwnQuantizer.backward:
    not scaled by mean|W|, nothing through the mean or the scale)."""

    @staticmethod
    def forward(ctx, wg):
        return binary_fake(wg.detach(), binary_scale(wg.detach()), center=True)

    @staticmethod
    def backward(ctx, g):
        return g


def bwn_fake(wg: torch.Tensor) -> torch.Tensor:
    """BiT's 1-bit weights (BwnQuantizer, layerwise when wg is one group). A weight exactly at the mean maps to
    +mean|W| here (a 1-bit code must be +-1) where BiT's torch.sign gives 0."""
    return _BwnSTE.apply(wg)


def bit_init_alpha(x: torch.Tensor, bits: int, signed: bool) -> float:
    """BiT's AlphaInit 'default': 2 mean|x| / sqrt(Qp) signed, 4 mean|x| / sqrt(Qp) unsigned, with
    Qp = 2^(b-1)-1 (signed) or 2^b-1 (unsigned), and Qp = 1 where that is 0 (signed 1 bit)."""
    qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    qp = qp or 1
    return float((2 if signed else 4) * x.detach().abs().mean() / math.sqrt(qp))


def _bit_alpha_grad(v, g, qn, qp, scale):
    small = (v < qn).to(g.dtype)
    big = (v > qp).to(g.dtype)
    middle = 1.0 - small - big
    return ((small * qn + big * qp + middle * (torch.round(v) - v)) * g * scale).sum(), middle


class _BitElasticSigned(torch.autograd.Function):
    """ElasticQuantBinarizerSigned: 1 bit alpha*sign(x) (Qn, Qp = -1, 1); b bits alpha*clip(round(x/alpha),
    -2^(b-1), 2^(b-1)-1). Gradients: x where Qn <= x/alpha <= Qp; alpha sum(sign(x) g) at 1 bit, else LSQ's
    sum((Qn | Qp | round(v) - v) g); both alpha gradients times 1/sqrt(numel * Qp)."""

    @staticmethod
    def forward(ctx, x, alpha, bits: int):
        qn, qp = (-1, 1) if bits == 1 else signed_range(bits)
        a = torch.where(alpha > BIT_ALPHA_EPS, alpha, torch.full_like(alpha, BIT_ALPHA_EPS))
        ctx.save_for_backward(x, a)
        ctx.other = 1.0 / math.sqrt(x.numel() * qp), qn, qp, bits
        q = torch.sign(x) if bits == 1 else torch.round(x / a).clamp(qn, qp)
        return q * a

    @staticmethod
    def backward(ctx, g):
        x, a = ctx.saved_tensors
        scale, qn, qp, bits = ctx.other
        v = x / a
        if bits == 1:
            middle = ((v >= qn) & (v <= qp)).to(g.dtype)
            ga = (torch.sign(x) * g * scale).sum()
        else:
            ga, middle = _bit_alpha_grad(v, g, qn, qp, scale)
        return middle * g, ga.reshape(a.shape), None


class _BitElasticUnsigned(torch.autograd.Function):
    """ElasticQuantBinarizerUnsigned: alpha*clip(round(x'/alpha), 0, 2^b-1) (+ min) with x' = x at 1 bit and
    x' = x - min(x) (the whole tensor's minimum, a constant) above; gradients as the signed one's multi-bit
    formula with Qn = 0."""

    @staticmethod
    def forward(ctx, x, alpha, bits: int):
        qn, qp = 0, 2**bits - 1
        lo = 0.0 if bits == 1 else x.min().item()
        xs = x if bits == 1 else x - lo
        a = torch.where(alpha > BIT_ALPHA_EPS, alpha, torch.full_like(alpha, BIT_ALPHA_EPS))
        ctx.save_for_backward(xs, a)
        ctx.other = 1.0 / math.sqrt(x.numel() * qp), qn, qp
        out = torch.round(xs / a).clamp(qn, qp) * a
        return out if bits == 1 else out + lo

    @staticmethod
    def backward(ctx, g):
        xs, a = ctx.saved_tensors
        scale, qn, qp = ctx.other
        ga, middle = _bit_alpha_grad(xs / a, g, qn, qp, scale)
        return middle * g, ga.reshape(a.shape), None


def bit_elastic(x: torch.Tensor, alpha: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """BiT's elastic activation quantizer on x (BiT's learnable per-channel bias is applied by the caller)."""
    fn = _BitElasticSigned if signed else _BitElasticUnsigned
    return fn.apply(x, alpha, int(bits))


# ----------------------------------------------------------------------------------- k-means


def kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (as scikit-learn: 2 + log k candidates per step) for each row of x (R, n)."""
    r, n = x.shape
    rows = torch.arange(r)
    first = torch.randint(0, n, (r,), generator=gen)
    centers = x[rows, first].unsqueeze(1)
    d2 = (x - centers).pow(2)
    trials = 2 + int(math.log(k))
    for _ in range(1, k):
        w = d2.clamp_min(0)
        total = w.sum(-1, keepdim=True)
        w = torch.where(total > 0, w, torch.ones_like(w))
        cand = torch.multinomial(w, trials, replacement=True, generator=gen)  # (R, t)
        cval = x.gather(1, cand)  # (R, t)
        new_d2 = torch.minimum(d2.unsqueeze(1), (x.unsqueeze(1) - cval.unsqueeze(-1)).pow(2))  # (R, t, n)
        best = new_d2.sum(-1).argmin(-1)  # (R,)
        centers = torch.cat([centers, cval[rows, best].unsqueeze(1)], 1)
        d2 = new_d2[rows, best]
    return centers


def codebook_assign(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest level of a sorted codebook for each value: x (R, n), codebook (R, K) -> long codes (R, n)."""
    mids = (codebook[:, 1:] + codebook[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), x.contiguous())


def kmeans_1d(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the values of each row of x (R, n) with k-means++ init, deterministic for a
    seed. Returns (codebook (R, k) sorted ascending, codes (R, n) long)."""
    x = x.detach().to(torch.float64)
    gen = torch.Generator().manual_seed(int(seed))
    r, n = x.shape
    c = kmeans_pp_init(x, k, gen).sort(-1).values
    for _ in range(iters):
        codes = codebook_assign(x, c)
        sums = torch.zeros(r, k, dtype=x.dtype).scatter_add_(1, codes, x)
        counts = torch.zeros(r, k, dtype=x.dtype).scatter_add_(1, codes, torch.ones_like(x))
        new = torch.where(counts > 0, sums / counts.clamp_min(1), c).sort(-1).values
        if torch.equal(new, c):
            break
        c = new
    return c, codebook_assign(x, c)


def codebook_fake(xg: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Grouped weights (R, 1, n) -> nearest codebook level (R, 1, n), identity STE to the weights."""
    codes = codebook_assign(xg.detach()[:, 0], codebook)
    levels = codebook.gather(1, codes).unsqueeze(1)
    return _GatherSTE.apply(xg, levels)
