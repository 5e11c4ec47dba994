""" 1.5-entmax, the sparse normaliser the official MoE Jetpack layer uses for its combine weights.

entmax15(z) = argmax_p <p, z> + H_1.5(p) over the simplex (Peters et al., 2019). Its solution is
p_i = [z_i / 2 - tau]_+ ** 2 with tau chosen so that p sums to one; tau is found exactly by sorting.
The backward pass is autograd through the closed form, which is exact on the (locally fixed) support.
"""
import torch

__all__ = ['entmax15']


def entmax15(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax along ``dim``: like softmax but with exact zeros for low scores. Returns x's shape."""
    x = x.transpose(dim, -1)
    x = x / 2
    x = x - x.amax(dim=-1, keepdim=True)
    x_sorted, _ = torch.sort(x, dim=-1, descending=True)
    n = x.shape[-1]
    rho = torch.arange(1, n + 1, device=x.device, dtype=x.dtype)
    mean = x_sorted.cumsum(dim=-1) / rho
    mean_sq = (x_sorted * x_sorted).cumsum(dim=-1) / rho
    ss = rho * (mean_sq - mean * mean)
    delta = (1 - ss) / rho
    tau = mean - torch.sqrt(delta.clamp(min=0))
    # at least 1: a row with a NaN has no element above tau, and index -1 would fail the whole batch (softmax only
    # makes that row NaN)
    support_size = (tau <= x_sorted).sum(dim=-1, keepdim=True).clamp(min=1)
    tau_star = tau.gather(-1, support_size - 1)
    out = (x - tau_star).clamp(min=0) ** 2
    return out.transpose(dim, -1)
