"""The per-token sums of the activation pass (behaviour.TokenStats): accumulated per layer over
the corpus's positions, written as files beside the pass's checkpoint and read back by memory map
(docs/method.md, "Every position"). ~110 MB a layer for SmolLM2 (3.2 GB in all): too big for the
channel store. A server whose data directory lacks them says so; `channelscope activations` on
it writes them."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import torch

from channelscope.method import behaviour


class TokenSums:
    """Running per-token sums of one layer over the corpus (behaviour.TokenStats once done).
    Rows are compact over the tokens the corpus holds (`rows`, [V] -> row or -1)."""

    def __init__(self, distinct: int, d: int, d_mlp: int):
        self.count = torch.zeros(distinct, dtype=torch.int64)
        self.next_count = torch.zeros(distinct, dtype=torch.int64)
        self.x_sum = torch.zeros(distinct, d)  # [Vc, d]
        self.x_total = torch.zeros(d, dtype=torch.float64)
        self.x_outer = torch.zeros(d, d, dtype=torch.float64)  # sum of x x^T
        # [Vc, d_mlp] while adding (a position's row at once); finish turns it to [d_mlp, Vc], where
        # one neuron's sums are contiguous for a page's read.
        self.act_next_sum = torch.zeros(distinct, d_mlp)
        self.act_total = torch.zeros(d_mlp, dtype=torch.float64)
        self.act_squares = torch.zeros(d_mlp, dtype=torch.float64)
        self.positions = 0

    def add(self, x: torch.Tensor, act: torch.Tensor, rows: torch.Tensor, next_rows: torch.Tensor) -> None:
        """x [n, d], act [n, d_mlp] at n real positions; rows [n] their tokens' rows, next_rows [n]
        the rows of the tokens after them (-1 at a document's end)."""
        followed = next_rows >= 0
        self.count += torch.bincount(rows, minlength=len(self.count))
        self.next_count += torch.bincount(next_rows[followed], minlength=len(self.count))
        self.x_sum.index_add_(0, rows, x)
        self.x_total += x.double().sum(0)
        self.x_outer += (x.T @ x).double()  # a batch's sum in float32 (fast), the running one in float64
        self.act_next_sum.index_add_(0, next_rows[followed], act[followed])
        act64 = act.double()
        self.act_total += act64.sum(0)
        self.act_squares += act64.pow(2).sum(0)
        self.positions += len(rows)

    def finish(self, rows: np.ndarray) -> behaviour.TokenStats:
        n = max(self.positions, 1)
        x_mean = self.x_total / n
        act_mean = self.act_total / n
        return behaviour.TokenStats(
            rows=rows,
            count=self.count.numpy(),
            next_count=self.next_count.numpy(),
            x_sum=self.x_sum.numpy(),
            x_mean=x_mean.numpy(),
            x_cov=(self.x_outer / n - torch.outer(x_mean, x_mean)).numpy(),
            act_next_sum=np.ascontiguousarray(self.act_next_sum.numpy().T),  # [d_mlp, Vc]
            act_mean=act_mean.numpy(),
            act_std=(self.act_squares / n - act_mean.pow(2)).clamp_min(0).sqrt().numpy(),
        )


def compact_rows(sequences: list[list[int]], vocab_size: int) -> tuple[np.ndarray, torch.Tensor]:
    """[V] each token's row in the per-token sums (-1: the corpus never holds it), as numpy and
    as a torch lookup."""
    seen = np.unique(np.fromiter((t for seq in sequences for t in seq), dtype=np.int64))
    rows = np.full(vocab_size, -1, dtype=np.int64)
    rows[seen] = np.arange(len(seen))
    return rows, torch.from_numpy(rows)


def positions(
    ids: torch.Tensor, mask: torch.Tensor, lookup: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of each real position's token and of the token after it (-1 at the end). [n] each"""
    rows = lookup[ids]  # [B, T]
    following = torch.full_like(rows, -1)
    following[:, :-1] = torch.where(mask[:, 1:], rows[:, 1:], -1)
    return rows[mask], following[mask]


# One file per field of behaviour.TokenStats but `rows`, which every layer shares.
_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(behaviour.TokenStats) if f.name != "rows")


def stats_dir(data_dir: Path, name: str, sha256: str, key: str) -> Path:
    return data_dir / "activations" / f"{name}-{sha256[:12]}-{key}-sums"


def write_stats(data_dir: Path, model, key: str, stats: dict[int, behaviour.TokenStats]) -> None:
    """Written beside, then swapped in by renaming: a web process may hold the old files memory-
    mapped, and rewriting a mapped file in place would pull pages from under it (SIGBUS)."""
    folder = stats_dir(data_dir, model.name, model.sha256, key)
    fresh, stale = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    for leftover in (fresh, stale):
        shutil.rmtree(leftover, ignore_errors=True)
    fresh.mkdir(parents=True)
    if stats:  # the rows are the same for every layer
        np.save(fresh / "rows.npy", next(iter(stats.values())).rows)
    for layer, found in stats.items():
        for name in _STATS_FIELDS:
            np.save(fresh / f"{layer}-{name}.npy", getattr(found, name))
    if folder.exists():
        folder.rename(stale)  # mapped files live on, unlinked, until their readers let go
    fresh.rename(folder)
    shutil.rmtree(stale, ignore_errors=True)


def read_stats(data_dir: Path, model, key: str, layer: int) -> behaviour.TokenStats | None:
    """One layer's per-token sums of the pass over corpus `key`, memory-mapped, or None. model:
    anything with name and sha256 (the loaded model or its stored row)."""
    folder = stats_dir(data_dir, model.name, model.sha256, key)
    if not (folder / f"{layer}-{_STATS_FIELDS[-1]}.npy").exists():
        return None
    fields = {name: np.load(folder / f"{layer}-{name}.npy", mmap_mode="r") for name in _STATS_FIELDS}
    return behaviour.TokenStats(rows=np.load(folder / "rows.npy"), **fields)
