"""Time LightGCN's propagation on MovieLens-100K's training graph, forward plus backward, with
PyTorch's generic sparse backward (COO and CSR) against ``symmetric_matmul``.

    python experiments/benchmark_propagation.py      # ~10 s, 1 thread

Prints milliseconds per 3-layer forward + backward (median of 5 rounds of 50 calls) and
checks that the three give the same gradient.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unlearn.recommend import load_movielens_100k  # noqa: E402
from unlearn.recommend.model import normalized_adjacency  # noqa: E402
from unlearn.recommend.sparse import symmetric_matmul  # noqa: E402

ML100K = ROOT.parent / "shared" / "data" / "ml-100k"
LAYERS, DIM = 3, 64


def forward_backward(matmul: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
                     ) -> torch.Tensor:
    x.grad = None
    y, out = x, x / (LAYERS + 1)
    for _ in range(LAYERS):
        y = matmul(y)
        out = out + y / (LAYERS + 1)
    (out * out).sum().backward()
    return x.grad


def time_ms(fn: Callable[[], object], calls: int = 50, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1000)
    return statistics.median(times)


def main() -> int:
    torch.set_num_threads(1)
    graph = load_movielens_100k(ML100K, download=False, min_rating=4)
    csr = normalized_adjacency(graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        coo = csr.to_sparse_coo().coalesce()
    x = torch.randn(graph.num_nodes, DIM, generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    variants = {"COO, generic backward": lambda y: coo @ y,
                "CSR, generic backward": lambda y: csr @ y,
                "CSR, symmetric_matmul": lambda y: symmetric_matmul(csr, y)}
    grads = {name: forward_backward(mm, x).clone() for name, mm in variants.items()}
    first = next(iter(grads.values()))
    same = all(torch.allclose(g, first, rtol=1e-4, atol=1e-6) for g in grads.values())
    print(f"graph: {graph.num_nodes} nodes, {csr.values().numel()} nonzeros; {LAYERS} layers, "
          f"dim {DIM}, torch {torch.__version__}, 1 thread; same gradients: {same}")
    for name, mm in variants.items():
        print(f"{name:24s} {time_ms(lambda mm=mm: forward_backward(mm, x)):6.2f} ms")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
