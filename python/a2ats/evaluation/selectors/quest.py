"""Quest (Tang et al. 2024): pages of tokens ranked by an upper bound of q·k from the
element-wise minimum and maximum of their keys."""

import torch

from .base import Selector


def page_bound_scores(query: torch.Tensor, keys: torch.Tensor, page_size: int) -> torch.Tensor:
    """Per query head and token, the bound of its page: Σ_d max(q_d·min_d, q_d·max_d).

    query (Hq, D), keys (Hkv, T, D) -> (Hq, T) f32; the last page may be partial.
    """
    num_kv, length, dim = keys.shape
    pages = -(-length // page_size)
    padded = torch.nn.functional.pad(keys.float(), (0, 0, 0, pages * page_size - length))
    blocks = padded.view(num_kv, pages, page_size, dim)
    valid = (torch.arange(pages * page_size) < length).view(1, pages, page_size, 1)
    highest = blocks.masked_fill(~valid, float("-inf")).amax(2)  # (Hkv, P, D)
    lowest = blocks.masked_fill(~valid, float("inf")).amin(2)
    group = query.shape[0] // num_kv
    q = query.float()[:, None, :]  # (Hq, 1, D)
    bound = torch.maximum(q * highest.repeat_interleave(group, 0), q * lowest.repeat_interleave(group, 0)).sum(
        -1
    )  # (Hq, P)
    return bound.repeat_interleave(page_size, 1)[:, :length]


class Quest(Selector):
    name = "quest"

    def __init__(self, page_size: int = 16):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size

    def scores(self, layer, query, keys, position):
        return page_bound_scores(query, keys, self.page_size)
