"""ggml's scale searches (ggml-quants.c) for every group of a chunk at once, and the error weights they minimise.

Each search fits one scale (and for the affine types a minimum) per group of values, weighted least squares over
candidate scales in ggml's order; the type families share them:
- make_qx_quants: Q6_K; Q4_0, Q5_0 and Q3_K with importance.
- make_q3_quants: Q3_K without importance.
- make_qkx_quants (ggml's make_qkx2_quants and make_qkx3_quants): Q2_K, Q4_K and Q5_K; Q4_1 and Q5_1 with importance;
  its arguments per encoder are the SEARCH_* tables below, shared with the fused Triton kernels.
- make_qp_quants: the sub-block scales and minimums of Q2_K, Q4_K and Q5_K with importance.
- pick_trial_scale: the choice among trial scales of make_qx_quants and of IQ4_NL / IQ4_XS's block scales.
With importance, the weights are ggml's imatrix * sqrt(sigma2 + x^2) (importance_weights), sigma2 from the blocks'
sums of squares (block_square_sums).

Groups lie along dim 1 of (n, groups) tensors (element-major, see chunking.py), so ggml's left-to-right sums over a
group become n whole-tensor additions in the same order.
"""
from __future__ import annotations

import numpy as np
import torch

from .chunking import to_element_major
from .ggml_arithmetic import (
    ROUND_EVEN_LIMIT, all_finite, divide, exact_sqrt, first_absmax, first_max, first_min, nearest_int, round_levels_,
    sequential_sum,
)

GROUP_MAX_EPS = 1e-15  # ggml: a group whose largest magnitude is below this is stored as zeros

# make_qkx2_quants' arguments in the encoders without importance, make_qkx3_quants' in those with it
SEARCH_Q4_K = dict(rmin=-1.0, rdelta=0.1, nstep=20)
SEARCH_Q5_K = dict(rmin=-0.5, rdelta=0.1, nstep=15)
SEARCH_Q2_K = dict(rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True)
SEARCH_WITH_IMPORTANCE = dict(rmin=-0.9, rdelta=0.05, nstep=36)
MAKE_QP_PASSES = 5  # make_qp_quants' refinement passes (itry)


def pick_trial_scale(sumlx: torch.Tensor, suml2: torch.Tensor, first_if_positive: bool):
    """ggml's choice among the trial scales of weighted least-squares fits (make_qx_quants, IQ4's block scales).

    sumlx, suml2: (trials, groups), the sums of w*x*l and w*l*l of each trial. Trial 0 gives the first scale
    sumlx/suml2 (0 where suml2 fails ggml's test: `suml2 > 0` with first_if_positive, else `suml2 != 0`); then in
    order each later trial replaces it where `suml2 > 0 && sumlx*sumlx > best*suml2`, best = scale*sumlx of the
    last accepted trial. Returns (scale, index of the accepted trial) per group.
    """
    ratios = divide(sumlx, suml2)
    first_valid = suml2[0] > 0 if first_if_positive else suml2[0] != 0
    scale = torch.where(first_valid, ratios[0], torch.zeros_like(ratios[0]))
    best = scale * sumlx[0]
    chosen = torch.zeros(scale.shape, dtype=torch.int64, device=scale.device)
    for trial in range(1, sumlx.shape[0]):
        better = (suml2[trial] > 0) & (sumlx[trial] * sumlx[trial] > best * suml2[trial])
        scale = torch.where(better, ratios[trial], scale)
        best = torch.where(better, ratios[trial] * sumlx[trial], best)
        chosen.masked_fill_(better, trial)
    return scale, chosen


# make_qx_quants on CPU: groups per batch, so that its (2, 19, batch) working tensors stay in cache
QX_CPU_GROUPS_PER_BATCH = 4096


def _qx_numerators(nmax: int, device: torch.device) -> torch.Tensor:
    """make_qx_quants' inverse-scale numerators in its order: -nmax, then -(nmax + 0.1f*is) for is = -9..9, is != 0."""
    steps = torch.tensor([s for s in range(-9, 10) if s != 0], dtype=torch.float32, device=device)
    offsets = torch.cat([torch.zeros(1, device=device), steps * 0.1]) + float(nmax)
    return -offsets


def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, weights) for every group of x at once.

    x: (n, ...) with the n values of each group along dim 0; weights broadcasts against x (pass x*x where ggml
    gets no quant weights). Returns (scale per group, levels (n, ...) uint8 in [0, 2*nmax)) as ggml stores them in
    L, all 0 for a group whose largest magnitude is below GROUP_MAX_EPS. On CPU the groups go through in batches
    small enough for the trials' working tensors to stay in cache.
    """
    x, weights, group_shape = _group_columns(x, weights)
    exact = not all_finite(x)
    batch = QX_CPU_GROUPS_PER_BATCH if x.device.type == "cpu" else x.shape[1]
    scale = torch.empty(x.shape[1], dtype=torch.float32, device=x.device)
    levels = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    for start in range(0, x.shape[1], batch):
        part = slice(start, start + batch)
        scale[part], levels[:, part] = _make_qx_quants(x[:, part], nmax, weights[:, part], exact)
    return scale.reshape(group_shape), levels.reshape(-1, *group_shape)


def _group_columns(x: torch.Tensor, weights: torch.Tensor):
    """x (n, ...) and weights broadcasting against it, as (n, groups) tensors; and the shape of the groups."""
    group_shape = x.shape[1:]
    n = x.shape[0]
    return x.reshape(n, -1), weights.expand(n, *group_shape).reshape(n, -1), group_shape


def _make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor, exact: bool):
    """make_qx_quants for x and weights (n, G).

    All 19 trial scales advance together, one value of the groups at a time, so that ggml's left-to-right sums are
    n additions of whole (2, 19, G) tensors; then pick_trial_scale chooses in ggml's order. For finite x,
    |x| <= |max| bounds every scaled value by nmax + 1, where torch.round is exact (see round_levels_).
    """
    amax, signed_max = first_absmax(x, dim=0)
    zero = amax < GROUP_MAX_EPS
    signed_max = torch.where(zero, torch.ones_like(signed_max), signed_max)
    iscales = divide(_qx_numerators(nmax, x.device).unsqueeze(1), signed_max.unsqueeze(0))  # (19, G)

    x_weighted = weights * x
    trial_levels = torch.empty(iscales.shape, dtype=torch.float32, device=x.device)
    products = torch.empty((2, *iscales.shape), dtype=torch.float32, device=x.device)
    sums = torch.zeros((2, *iscales.shape), dtype=torch.float32, device=x.device)  # C's sums start at +0.0
    for i in range(x.shape[0]):
        round_levels_(torch.mul(iscales, x[i], out=trial_levels), -nmax, nmax - 1, exact)
        torch.mul(trial_levels, x_weighted[i], out=products[0])  # (w*x)*l
        torch.mul(trial_levels, weights[i], out=products[1]).mul_(trial_levels)  # (w*l)*l
        sums += products

    scale, chosen = pick_trial_scale(sums[0], sums[1], first_if_positive=False)
    best_iscale = iscales.gather(0, chosen.unsqueeze(0))
    levels = round_levels_(x * best_iscale, -nmax, nmax - 1, exact).add_(nmax).to(torch.uint8)
    levels.masked_fill_(zero, 0)
    return scale.masked_fill_(zero, 0.0), levels


def make_qkx_quants(
    x: torch.Tensor, nmax: int, weights: torch.Tensor, rmin: float = -0.9, rdelta: float = 0.05, nstep: int = 36,
    use_mad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants and make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep,
    use_mad) for every group of x at once (the defaults are make_qkx3's arguments in the imatrix encoders).

    The two C functions are one algorithm: they differ only in the early return for a flat group (`max == min`
    against `max <= min`), and min <= max holds in both unless x[0] is NaN, where neither returns early.
    x and weights: (n, ...) with the n values of each group along dim 0. Returns (scale, the_min, levels): scale
    and the_min (ggml's *the_min, minus the offset) per group, levels (n, ...) uint8 in [0, nmax].

    The search is sequential over its nstep+1 candidates because an accepted candidate moves the offset that later
    candidates start from; every group advances at once. The best levels are not kept but recomputed at the end
    from the (iscale, offset) that produced them.
    """
    x, weights, group_shape = _group_columns(x, weights)
    n = x.shape[0]
    finite = all_finite(x)
    # ggml's scans start from x[0]: a NaN there stays, since no comparison with it is true
    first = x[0]
    x_low = torch.where(torch.isnan(first), first, first_min(x, dim=0, start=float("inf")))
    highest = torch.where(torch.isnan(first), first, first_max(x, dim=0, start=float("-inf")))
    lowest = torch.where(x_low > 0, torch.zeros_like(x_low), x_low)
    flat = highest <= lowest  # ggml returns at once: levels 0, scale 0
    # a harmless range for flat groups, so that no inf/NaN from them forces the exact rounding; masked at the end
    highest = torch.where(flat, lowest.abs() * 2 + 1, highest)
    sum_w = sequential_sum(weights, from_zero=False)
    sum_x = sequential_sum(weights * x, from_zero=False)  # ggml starts it at sum_w * x[0], i.e. w[0]*x[0]
    steps = torch.arange(nstep + 1, dtype=torch.float32, device=x.device)
    rmin_f, rdelta_f = (torch.tensor(value, dtype=torch.float32, device=x.device) for value in (rmin, rdelta))
    numerators = (rmin_f + rdelta_f * steps) + float(nmax)  # C's rmin + rdelta*is + nmax, in float32

    trial = torch.empty_like(x)
    # w*l, w*l*l and w*l*x of every element side by side, so that one run of additions sums all three
    products = torch.empty((n, 3, x.shape[1]), dtype=torch.float32, device=x.device)
    diff = products[:, 0]  # the error terms reuse the first plane once the sums are taken

    def grid_levels(minimum, iscale):
        """MAX(0, MIN(nmax, nearest_int(iscale*(x - minimum)))) into `trial`. iscale*(x - minimum) is monotonic
        along a group and equals the step's numerator at the group's maximum, so its minimum bounds it."""
        torch.mul(torch.sub(x, minimum, out=trial), iscale, out=trial)
        bound = (x_low - minimum).mul_(iscale).abs_().max()
        return round_levels_(trial, 0, nmax, not finite or not bool(bound <= ROUND_EVEN_LIMIT))

    def error(levels, scale, minimum):
        torch.mul(levels, scale, out=diff).add_(minimum).sub_(x)
        (diff.abs_() if use_mad else diff.mul_(diff)).mul_(weights)
        return sequential_sum(diff)

    iscale = divide(float(nmax), highest - lowest)
    scale = divide(1.0, iscale)
    best_error = error(grid_levels(lowest, iscale), scale, lowest)
    # Rows: error, grid iscale, grid minimum, scale, minimum of the best fit so far
    best = torch.stack([best_error, iscale, lowest, scale, lowest])
    candidate = torch.empty_like(best)
    for step in range(nstep + 1):
        minimum = best[4]
        # ggml reuses the best minimum found so far, not the group's own, for the next step's grid
        iscale = torch.div(numerators[step], highest - minimum, out=candidate[1])
        candidate[2].copy_(minimum)
        grid_levels(minimum, iscale)
        weighted = torch.mul(weights, trial, out=products[:, 0])
        torch.mul(weighted, trial, out=products[:, 1])
        torch.mul(weighted, x, out=products[:, 2])
        sum_l, sum_l2, sum_xl = sequential_sum(products)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = torch.div(sum_w * sum_xl - sum_x * sum_l, det, out=candidate[3])
        this_min = torch.div(sum_l2 * sum_x - sum_l * sum_xl, det, out=candidate[4])
        positive_min = this_min > 0
        this_min.masked_fill_(positive_min, 0.0)
        torch.where(positive_min, sum_xl / sum_l2, this_scale, out=this_scale)
        trial_error = candidate[0].copy_(error(trial, this_scale, this_min))
        better = (det > 0) & (trial_error < best[0])
        best = torch.where(better, candidate, best)
    _, best_iscale, best_grid_min, scale, minimum = best
    levels = grid_levels(best_grid_min, best_iscale).masked_fill_(flat, 0.0).to(torch.uint8)
    scale = scale.masked_fill(flat, 0.0)
    minimum = torch.where(flat, lowest, minimum)
    return scale.reshape(group_shape), (-minimum).reshape(group_shape), levels.reshape(n, *group_shape)


def make_qp_quants(values: torch.Tensor, nmax: int, weights: torch.Tensor):
    """ggml's make_qp_quants on every column of values (elements along dimension 0): a scale >= 0 and levels 0..nmax.

    Returns (levels as the uint8 values ggml stores, int32, like values; scale float32 per column).
    """
    count = values.shape[0]
    vmax = values.amax(dim=0).clamp_(min=0.0)
    negligible = vmax < GROUP_MAX_EPS
    weighted_values = weights * values  # ggml's w*x[i]*l is (w*x[i])*l

    def weighted_square_error(levels, scale):
        diff = values - scale * levels
        return sequential_sum(weights * diff * diff)

    iscale = divide(float(nmax), vmax)
    first = (nearest_int(iscale * values) & 0xFF).to(torch.float32)
    best_mse = weighted_square_error(first, divide(1.0, iscale))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        numerator = float(np.float32(0.1) * np.float32(step) + np.float32(nmax))
        trial_iscale = divide(numerator, vmax)
        trial = nearest_int(trial_iscale * values).clamp_(max=nmax).to(torch.float32)
        mse = weighted_square_error(trial, divide(1.0, trial_iscale))
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        iscale = torch.where(better, trial_iscale, iscale)

    chosen = nearest_int(iscale * values).clamp_(max=nmax)
    levels = (chosen & 0xFF).to(torch.float32)  # the stored uint8 values, exact in float32
    chosen = chosen.to(torch.float32)
    sum_lx = sequential_sum(weighted_values * chosen)
    sum_l2 = sequential_sum(weights * chosen * chosen)
    for _ in range(MAKE_QP_PASSES):
        changed = torch.zeros_like(negligible)
        for i in range(count):
            w, wx, current = weights[i], weighted_values[i], levels[i]
            slx = sum_lx - wx * current
            sl2 = sum_l2 - w * current * current
            # wherever slx > 0 and sl2 > 0 (the only places the proposal is used) the quotient is not NaN
            proposed = nearest_int(values[i] * sl2 / slx).clamp_(max=nmax)
            proposed_f = proposed.to(torch.float32)
            candidate = (slx > 0) & (sl2 > 0) & (proposed_f != current)
            slx = slx + wx * proposed_f
            sl2 = sl2 + w * proposed_f * proposed_f
            accept = candidate & (slx * slx * sum_l2 > sum_lx * sum_lx * sl2)
            torch.where(accept, (proposed & 0xFF).to(torch.float32), current, out=current)
            sum_lx = torch.where(accept, slx, sum_lx)
            sum_l2 = torch.where(accept, sl2, sum_l2)
            changed |= accept
        if not bool(changed.any()):  # a pass that changes nothing leaves the state for the next one unchanged
            break
    levels = levels.to(torch.int32)
    scale = torch.where(sum_l2 > 0, sum_lx / sum_l2, torch.zeros_like(sum_l2))
    levels = levels.masked_fill_(negligible, 0)
    scale = scale.masked_fill(negligible, 0.0)
    return levels, scale


def make_q3_quants(x: torch.Tensor, nmax: int = 4, max_passes: int = 5):
    """ggml's make_q3_quants(n=16, nmax, x, L, do_rmse=true) for groups x (16, G), 16 values per column.

    ggml refines one level at a time: in up to 5 passes over the group, element i moves to the level that fits it
    best given the others when that raises the x^2-weighted fit, and a pass without any move ends the search.
    Every element before the first move of a pass sees the same sums, so instead of stepping element by element,
    each round evaluates all the elements of a group still ahead in its pass and applies only the first move;
    the next round continues after it. Most groups make no move in their first pass and are done after one round.
    Returns (scale (G,), levels (16, G) uint8 in [0, 2*nmax)).
    """
    n, n_groups = x.shape
    amax, signed_max = first_absmax(x, dim=0)
    zero = amax < GROUP_MAX_EPS
    signed_max = torch.where(zero, torch.ones_like(signed_max), signed_max)
    weights = x * x
    x_weighted = weights * x
    levels = round_levels_(x * divide(float(-nmax), signed_max), -nmax, nmax - 1, exact=not all_finite(x))
    sumlx, suml2 = sequential_sum(torch.stack([x_weighted * levels, (weights * levels) * levels]), dim=1)

    position = torch.zeros(n_groups, dtype=torch.int64, device=x.device)  # next element of the current pass
    passes = torch.zeros(n_groups, dtype=torch.int64, device=x.device)  # passes completed
    moved = torch.zeros(n_groups, dtype=torch.bool, device=x.device)  # whether the current pass moved a level
    element = torch.arange(n, device=x.device).unsqueeze(1)
    active = torch.arange(n_groups, device=x.device)
    while active.numel():
        if active.numel() == n_groups:
            xs, ws, wxs, ls = x, weights, x_weighted, levels
        else:
            xs, ws, wxs, ls = (t.index_select(1, active) for t in (x, weights, x_weighted, levels))
        sx, s2 = sumlx[active], suml2[active]
        slx = sx - wxs * ls
        sl2 = s2 - (ws * ls) * ls
        new_levels = nearest_int(xs * sl2 / slx).clamp_(-nmax, nmax - 1).to(torch.float32)
        candidate = (new_levels != ls) & (slx > 0)
        if bool(position.any()):
            candidate &= element >= position[active]
        # the acceptance test, only where a level would change (few elements)
        at, column = candidate.nonzero(as_tuple=True)
        new_level = new_levels[at, column]
        new_slx = slx[at, column] + wxs[at, column] * new_level
        new_sl2 = sl2[at, column] + (ws[at, column] * new_level) * new_level
        sx_c, s2_c = sx[column], s2[column]
        accept = (new_sl2 > 0) & ((new_slx * new_slx) * s2_c > (sx_c * sx_c) * new_sl2)
        at, column, new_level, new_slx, new_sl2 = (t[accept] for t in (at, column, new_level, new_slx, new_sl2))
        # only the first accepted element of each group moves in this round
        first = torch.full(active.shape, n, dtype=torch.int64, device=x.device)
        first.scatter_reduce_(0, column, at, reduce="amin")
        take = at == first[column]
        at, column, new_level, new_slx, new_sl2 = (t[take] for t in (at, column, new_level, new_slx, new_sl2))
        groups = active[column]
        levels[at, groups] = new_level
        sumlx[groups] = new_slx
        suml2[groups] = new_sl2
        position[groups] = at + 1
        moved[groups] = True

        ended = active[first == n]  # their pass ran to the end
        position[ended] = 0
        passes[ended] += 1
        again = ended[moved[ended] & (passes[ended] < max_passes)]
        moved[again] = False
        active = torch.cat([groups, again])

    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    levels = (levels + nmax).to(torch.uint8)
    if bool(zero.any()):
        levels[:, zero] = 0
        scale[zero] = 0.0
    return scale, levels


# ---------------------------------------------------------------- the weights the searches minimise

def block_square_sums(rows: torch.Tensor, block: int) -> torch.Tensor:
    """ggml's `sum += x[j]*x[j]` over each block of `block` values of every row, left to right: (R*N/block,)."""
    return sequential_sum(to_element_major(rows * rows, block))


def importance_weights(importance: torch.Tensor, x: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """ggml's weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j]) for element-major x (block, groups) of whole rows.

    importance: the (n_per_row,) imatrix vector of one row; x's groups run through the rows in order, so the
    vector repeats every n_per_row/block groups. sigma2 broadcasts against x (one value per group).
    """
    block = x.shape[0]
    per_group = importance.reshape(-1, block).t().unsqueeze(1)  # (block, 1, groups per row)
    root = exact_sqrt(sigma2 + x * x)
    return (per_group * root.reshape(block, -1, per_group.shape[2])).reshape(block, -1)
