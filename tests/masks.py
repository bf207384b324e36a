"""Key-padding masks for the masked attention kernel tests (TVM and Triton backward)."""
import torch


def padding_masks(T):
    """[5, T] 0/1 masks: left padding (the first query that sees a key sees only itself; earlier ones see none),
    right padding, a fully padded row, all ones, and random holes."""
    m = torch.ones(5, T, dtype=torch.long)
    m[0, :max(1, T // 2)] = 0
    m[1, T - T // 3:] = 0
    m[2] = 0
    m[4] = (torch.rand(T, generator=torch.Generator().manual_seed(T)) < 0.6).long()
    return m
