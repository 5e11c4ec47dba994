""" Which channels, heads and hidden neurons a successor keeps: the selection methods of checkpoint recycling.

All randomness comes from explicit, seeded CPU ``torch.Generator``s and float64 arithmetic, so a selection
depends only on (statistics, seed, names), never on global RNG state or library versions.

Methods for expert neurons (``METHODS``):
    importance  each expert samples its neurons without replacement, with probability proportional to the
                neuron statistic (Efraimidis-Spirakis weighted sampling)
    graph       the neuron co-activation graph is partitioned with METIS (pymetis); each expert samples whole
                parts without replacement, in proportion to their intra-part co-activation, until it is full
    uniform     an evenly strided subset (the same for every expert)
    random      a uniformly random subset per expert
    copy        sparse upcycling: every core expert takes the top neurons the recycled dense successor would
                keep; universal experts an evenly strided subset of them
"""
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

__all__ = ['METHODS', 'Method', 'NUM_GRAPH_PARTS', 'select_block_neurons', 'make_generator', 'weighted_order',
           'weighted_sample', 'top_k', 'uniform_indices', 'select_neurons', 'partition_graph']

NUM_GRAPH_PARTS = 32  # METIS parts of a co-activation graph, as the official tool


def make_generator(seed: int, *names) -> torch.Generator:
    """An independent generator per (seed, names): the draw of one layer never shifts another's."""
    key = zlib.crc32(repr(names).encode())
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + key) % (2 ** 63))


def weighted_order(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random permutation in which each prefix is a weighted sample without replacement, P ~ weights.

    Efraimidis-Spirakis keys log(u) / w, sorted descending; zero weights come last, by index.
    """
    w = weights.double().clamp(min=0)
    u = torch.rand(w.numel(), generator=generator, dtype=torch.float64).clamp(min=1e-300)
    # numpy's log: ATen runs a float64 log on both threads even for a few thousand values, and on a busy machine
    # each of the thousands of calls here (one per expert) then waits milliseconds for the second thread
    keys = torch.where(w > 0, torch.from_numpy(np.log(u.numpy())) / w, torch.full_like(w, -float('inf')))
    return torch.argsort(keys, descending=True, stable=True)


def weighted_sample(weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k indices without replacement, P ~ weights, sorted ascending."""
    if k > weights.numel():
        raise ValueError(f'cannot sample {k} of {weights.numel()} items without replacement')
    return weighted_order(weights, generator)[:k].sort().values


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties by index), sorted ascending."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return order[:k].sort().values


def uniform_indices(n: int, k: int) -> torch.Tensor:
    """k evenly spaced indices of range(n), endpoints included."""
    if k > n:
        raise ValueError(f'cannot take {k} of {n} items')
    return torch.linspace(0, n - 1, k, dtype=torch.float64).round().long()


def partition_graph(coact: torch.Tensor, num_parts: int) -> torch.Tensor:
    """METIS partition of a co-activation graph: (n, n) counts -> part id per node, (n,) long.

    The graph is symmetrised, self-loops dropped and weights scaled to integers; ``num_parts`` is clamped so
    METIS cannot collapse everything into one part (which it may do when parts >= nodes / 2).
    """
    import pymetis

    n = coact.shape[0]
    num_parts = int(max(2, min(num_parts, n // 4)))
    a = coact.double()
    a = (a + a.t()) / 2
    a.fill_diagonal_(0)
    scale = a.max()
    weights = (a / scale * 1000).round().long() if scale > 0 else torch.zeros_like(a, dtype=torch.long)
    adj = weights > 0
    xadj = np.concatenate([[0], np.cumsum(adj.sum(1).numpy())]).astype(np.int64)
    rows, cols = adj.nonzero(as_tuple=True)
    if rows.numel() == 0:  # no co-activation at all: contiguous blocks are as good as any partition
        return torch.div(torch.arange(n) * num_parts, n, rounding_mode='floor')
    adjacency = pymetis.CSRAdjacency(adj_starts=xadj, adjacent=cols.numpy().astype(np.int64))
    _, parts = pymetis.part_graph(num_parts, adjacency, eweights=weights[rows, cols].numpy())
    parts = torch.as_tensor(np.asarray(parts), dtype=torch.long)
    # relabel to 0..P-1 without gaps (METIS may leave a part empty)
    return torch.unique(parts, return_inverse=True)[1]


def _intra_part_coactivation(parts: torch.Tensor, coact: torch.Tensor) -> torch.Tensor:
    """(P,) sum of co-activation counts inside each part."""
    one_hot = torch.nn.functional.one_hot(parts).double()  # (H, P)
    return ((one_hot.t() @ coact.double()) * one_hot.t()).sum(1)


def _graph_sample(
        parts: torch.Tensor,
        intra: torch.Tensor,
        importance: torch.Tensor,
        k: int,
        generator: torch.Generator,
) -> torch.Tensor:
    """Whole parts sampled by intra-part co-activation until k neurons; the last part is cut by importance."""
    chosen = []
    total = 0
    for p in weighted_order(intra + 1e-12, generator).tolist():
        nodes = (parts == p).nonzero().flatten()
        need = k - total
        if nodes.numel() > need:
            nodes = nodes[top_k(importance[nodes], need)]
        chosen.append(nodes)
        total += nodes.numel()
        if total == k:
            break
    return torch.cat(chosen).sort().values


@dataclass(frozen=True)
class Method:
    """A neuron selection method.

    ``rows(num_experts, k, importance, generator, context)`` returns one (k,) sorted index row per expert;
    ``context`` holds 'coact' / 'parts' (graph) and 'copy_pool' (copy) where the method needs them.
    """
    rows: Callable[..., List[torch.Tensor]]
    needs_coactivation: bool = False  # co-activation counts from calibration images (not data-free)
    dense_method: Optional[str] = None  # the method a dense MLP (a single row) uses instead; None: itself
    univ_from_core: bool = False  # universal experts are taken from the core experts' neurons


def _copy_rows(n, k, importance, g, ctx):
    pool = ctx.get('copy_pool')
    if pool is None or pool.numel() < k:  # no core experts, or universal ones wider than them: the top k
        pool = top_k(importance, k)
    return [pool if pool.numel() == k else pool[uniform_indices(pool.numel(), k)]] * n


def _graph_rows(n, k, importance, g, ctx):
    if ctx.get('coact') is None or ctx.get('parts') is None:
        raise ValueError("method 'graph' needs co-activation statistics")
    intra = _intra_part_coactivation(ctx['parts'], ctx['coact'])
    return [_graph_sample(ctx['parts'], intra, importance, k, g) for _ in range(n)]


# the one place to add a method: name -> how it draws each expert's neurons
METHODS: Dict[str, Method] = {
    'importance': Method(lambda n, k, w, g, ctx: [weighted_sample(w, k, g) for _ in range(n)]),
    'graph': Method(_graph_rows, needs_coactivation=True, dense_method='importance'),
    'uniform': Method(lambda n, k, w, g, ctx: [uniform_indices(w.numel(), k)] * n),
    'random': Method(lambda n, k, w, g, ctx: [torch.randperm(w.numel(), generator=g)[:k].sort().values
                                              for _ in range(n)]),
    # sparse upcycling: every core expert takes the top neurons the recycled dense successor would keep;
    # universal experts an evenly strided subset of them
    'copy': Method(_copy_rows, univ_from_core=True),
}


def select_neurons(
        method: str,
        num_experts: int,
        k: int,
        importance: torch.Tensor,
        generator: torch.Generator,
        coact: Optional[torch.Tensor] = None,
        parts: Optional[torch.Tensor] = None,
        copy_pool: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Hidden neurons for ``num_experts`` experts of width k: (E, k) long, each row sorted, no repeats in a row.

    Args:
        method: one of ``METHODS``.
        importance: (H,) neuron statistic of the predecessor MLP.
        coact, parts: co-activation counts (H, H) and their METIS partition, for 'graph'.
        copy_pool: for 'copy', the neurons the dense successor keeps (experts take it whole, or evenly
            strided when narrower; wider experts take the top k instead).
    """
    H = importance.numel()
    if k > H:
        raise ValueError(f"a successor MLP or expert of {k} hidden neurons cannot be sampled from the predecessor's "
                         f"MLP of {H}: build the successor with MLPs of at most {H} (mlp_ratio; core_hidden for "
                         f"V-JetMoE, core_mlp_ratio for C-JetMoE)")
    if method not in METHODS:
        raise ValueError(f"Unknown method '{method}'; choose one of {', '.join(METHODS)}.")
    rows = METHODS[method].rows(num_experts, k, importance, generator,
                                dict(coact=coact, parts=parts, copy_pool=copy_pool))
    return torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.long)


def dense_neurons(method: str, k: int, importance: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The k neurons a dense (non-MoE) MLP of the successor keeps: (k,) long, sorted."""
    return select_neurons(METHODS[method].dense_method or method, 1, k, importance, generator)[0]


def select_block_neurons(mlp, importance: torch.Tensor, method: str, seed: int, layer,
                         coact_fn: Callable[[], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The hidden neurons one successor block takes from its predecessor block's dense MLP (statistics
    ``importance``, (hidden,)), by what they are: a dense MLP's ``{'mlp': (h,)}``; a SpheroMoE layer's
    ``{'graph_parts': (hidden,)}`` (graph method only), ``'core_neurons'`` (E_core, h_core) and ``'univ_neurons'``
    (E_univ, h_univ). ``layer`` names the block's generators; ``coact_fn`` is called only for methods that need the
    MLP's co-activation counts."""
    if not hasattr(mlp, 'num_core_experts'):  # a dense MLP
        return {'mlp': dense_neurons(method, mlp.fc1.out_features, importance, make_generator(seed, 'mlp', layer))}
    out = {}
    coact = parts = None
    if METHODS[method].needs_coactivation:
        coact = coact_fn()
        out['graph_parts'] = parts = partition_graph(coact, NUM_GRAPH_PARTS)
    core = select_neurons(method, mlp.num_core_experts, mlp.core_hidden, importance,
                          make_generator(seed, 'core', layer), coact=coact, parts=parts)
    pool = core[0] if METHODS[method].univ_from_core and core.numel() else None
    out['core_neurons'] = core
    out['univ_neurons'] = select_neurons(method, mlp.num_univ_experts, mlp.univ_hidden, importance,
                                         make_generator(seed, 'univ', layer), coact=coact, parts=parts,
                                         copy_pool=pool)
    return out
