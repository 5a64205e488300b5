"""The attention op at the demos' shapes on CPU in bf16: SDPA against `mdm.models.blocks.attention`, printed as a
markdown table.

Run from the repository root, alone on the machine:

    .venv/bin/python benchmarks/attention_speed.py [--steps N] [--threads N]

Heads come out of a 1x1 convolution as strided views, as in `Attention2D`; each row is one (batch, heads, queries,
keys, head width) case: self-attention over an 8x8 / 4x4 / 16x16 image, cross-attention of an 8x8 image to 13 text
tokens (two of them padding). Training is forward and backward under bf16 autocast, sampling a no-grad forward; the
median over `--steps` calls after two warm-up calls, SDPA and mdm alternating so that both see the same machine.
mdm's training calls take SDPA too (the explicit path is for sampling only), so those columns agree by design.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mdm.models.blocks import attention

CASES = {  # name: (batch, heads, queries side, keys (None: self-attention), channels)
    "self 8x8, 96 ch": (32, 8, 8, None, 96),
    "self 4x4, 128 ch": (32, 8, 4, None, 128),
    "self 16x16, 64 ch": (32, 8, 16, None, 64),
    "cross 8x8 to 13 tokens, 96 ch": (32, 8, 8, 13, 96),
}


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C, N) -> (B, n, N, C / n) as a strided view, the layout `Attention2D` hands to the op."""
    b, c, length = x.shape
    return x.view(b, n, c // n, length).transpose(-1, -2)


def operands(case: tuple, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q, k, v (bf16, strided) and the key mask of a case."""
    batch, n, side, keys, channels = case
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, channels, side * side, generator=g)
    kv = torch.randn(batch, 2 * channels, keys or side * side, generator=g)
    mask = None
    if keys:
        mask = torch.ones(batch, keys, dtype=torch.bool)
        mask[:, -2:] = False
    q, kv = (t.bfloat16().requires_grad_(grad) for t in (q, kv))
    k, v = kv.chunk(2, dim=1)
    return heads(q, n), heads(k, n), heads(v, n), mask


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA on the same operands (what `attention` ran before its CPU bf16 path)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])


def mdm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The library's attention."""
    return attention(q, k, v, mask, fp32_softmax=False, sampling=not torch.is_grad_enabled())


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed calls per cell")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# attention_speed on CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, bf16\n")
    print("| case | training SDPA ms | training mdm ms | sampling SDPA ms | sampling mdm ms |")
    print("|---|---:|---:|---:|---:|")
    for name, case in CASES.items():
        cells = []
        for grad in (True, False):
            q, k, v, mask = operands(case, grad)

            def call(op: Callable, q=q, k=k, v=v, mask=mask, grad=grad) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
                    out = op(q, k, v, mask)
                if grad:
                    out.float().square().mean().backward()

            times: dict[Callable, list[float]] = {sdpa: [], mdm: []}
            for i in range(args.steps + 2):
                for op, ts in times.items():
                    t = timed(lambda op=op: call(op))
                    if i >= 2:
                        ts.append(t)
            cells += [f"{1e3 * statistics.median(ts):.2f}" for ts in times.values()]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
