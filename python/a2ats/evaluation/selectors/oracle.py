"""Oracle top-K: the true scores q·k, the best any top-K selector can pick."""

import torch

from .base import Selector


class Oracle(Selector):
    name = "oracle"

    def scores(self, layer, query, keys, position):
        num_kv, length, dim = keys.shape
        grouped = query.float().view(num_kv, -1, dim)  # (Hkv, G, D)
        return torch.matmul(grouped, keys.float().transpose(1, 2)).reshape(-1, length)
