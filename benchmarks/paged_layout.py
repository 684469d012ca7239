"""Why a paged K scores slower than the same keys packed (issue 19): the layout of the cache blocks or the kernel.

The serving sweep's paged batches (`paged 4 prompts 8k-32k`, `paged 8 prompts 0.5k-4k`, window 64, 32/8, fp16)
place each prompt's 16-key blocks in a random order in the cache; the same keys packed take 0.254 / 0.079 ms
against 0.334 / 0.105 paged (thirty-third session, after _paged_stages). The paged kernels differ from the packed
ones only in the block-table load before each key tile, and the padded output (zeros past each prompt's keys). This
times, same process, same keys, alternated three times: packed (colreduce_varlen), paged with the sweep's random
block order, and paged with each prompt's blocks consecutive in the cache (what a fresh vLLM engine's free-block
queue hands out) — both passes, and with the lse given (the column pass alone). If consecutive blocks close the gap,
the cost is where the blocks lie (address translation, DRAM locality), not the kernel; if not, it is the kernel's.
Each paged result is checked bitwise equal between the two block orders (same keys, same kernels, same order of
summation) and against the packed result (relative difference).

    python benchmarks/paged_layout.py --out DIR     # GPU: DIR/paged_layout.json
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tma_ab import _setup  # noqa: E402

SHAPES = ("paged 4 prompts 8k-32k win64 32/8", "paged 8 prompts 0.5k-4k win64 32/8")


def consecutive_cache(case: dict, lens: list[int], block: int = 16):
    """(cache, table) holding the case's packed keys with each prompt's blocks consecutive, prompts one after
    another (the sweep's case has them in a random order)."""
    k = case["k"]
    nblk = [-(-n // block) for n in lens]
    cache = torch.zeros(sum(nblk), block, *k.shape[1:], device=k.device, dtype=k.dtype)
    table = torch.zeros(len(lens), max(nblk), dtype=torch.int32, device=k.device)
    first, start = 0, 0
    for i, (n, nb) in enumerate(zip(lens, nblk)):
        table[i, :nb] = torch.arange(first, first + nb, dtype=torch.int32, device=k.device)
        cache.view(-1, *k.shape[1:])[first * block: first * block + n] = k[start:start + n]
        first, start = first + nb, start + n
    return cache, table


def _unpack(padded: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """(B, H, max_n) padded paged output → (ΣN, H) packed."""
    return torch.cat([padded[b, :, :n].T for b, n in enumerate(lens)])


def main(argv=None):
    bk, kmod, flush, record = _setup(__doc__, "paged_layout.json", argv)
    shapes = bk.serving_shapes()
    for name in SHAPES:
        sh = shapes[name]
        case = bk._serving_case(sh)
        lse = bk._lse_for(sh, case)
        cache, table = consecutive_cache(case, sh["lens"])
        arms = {"packed": (dict(sh, mode="varlen"), case),
                "paged random blocks": (sh, case),
                "paged consecutive blocks": (sh, dict(case, cache=cache, table=table))}
        outs = {}
        for rep in range(3):
            for arm, (s, c) in arms.items():
                for with_lse in (False, True):
                    fn = bk._ours_fn(s, c, kmod._VARIANT, with_lse, lse)
                    outs[arm, with_lse] = fn()
                    t = bk.time3(fn, flush)
                    record(dict(shape=name, arm=arm, lse_given=with_lse, rep=rep, gpu_ms=t["gpu_ms"],
                                e2e_ms=t["e2e_ms"], host_us=t["host_us"]))
        for with_lse in (False, True):
            ref = outs["packed", with_lse]
            rand, cons = outs["paged random blocks", with_lse], outs["paged consecutive blocks", with_lse]
            record(dict(shape=name, lse_given=with_lse, paged_orders_bitwise_equal=torch.equal(rand, cons),
                        rel_diff_paged_vs_packed=((_unpack(rand, sh["lens"]) - ref).norm() / ref.norm()).item()))


if __name__ == "__main__":
    main()
