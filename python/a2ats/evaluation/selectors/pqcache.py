"""PQCache-style (Zhang et al. 2025): product quantization of the post-RoPE keys, fitted by
k-means on each sequence at prefill, with no query awareness; decode tokens take their nearest
centroids. Scores are q·ĉ from the codes."""

import torch

import a2ats_core

from ...kmeans import kmeans
from .base import Selector


class PQCache(Selector):
    name = "pqcache"

    def __init__(self, num_subspaces: int = 2, num_centroids: int = 64, max_iter: int = 20, seed: int = 0):
        self.num_subspaces, self.num_centroids = num_subspaces, num_centroids
        self.max_iter, self.seed = max_iter, seed
        self.centroids: dict[int, torch.Tensor] = {}  # layer -> (Hkv, M, C, D/M)
        self.codes: dict[int, torch.Tensor] = {}  # layer -> (Hkv, T, M) int16

    def reset(self):
        self.centroids.clear()
        self.codes.clear()

    def prefill(self, layer, keys):
        num_kv, length, dim = keys.shape
        if dim % self.num_subspaces:
            raise ValueError(f"num_subspaces {self.num_subspaces} must divide head_dim {dim}")
        sub = dim // self.num_subspaces
        problems = keys.float().view(num_kv, length, self.num_subspaces, sub).transpose(1, 2)
        problems = problems.reshape(num_kv * self.num_subspaces, length, sub)
        fitted = kmeans(
            problems.contiguous(), min(self.num_centroids, length), max_iter=self.max_iter, seed=self.seed + layer
        ).centroids
        self.centroids[layer] = fitted.view(num_kv, self.num_subspaces, -1, sub).contiguous()
        self.codes[layer] = a2ats_core.vq_encode(keys.float()[None], self.centroids[layer])[0]

    def append(self, layer, keys, position):
        codes = a2ats_core.vq_encode(keys.float()[None], self.centroids[layer])[0]
        self.codes[layer] = torch.cat([self.codes[layer], codes], 1)

    def scores(self, layer, query, keys, position):
        codes = self.codes[layer][None]  # (1, Hkv, T, M)
        lengths = torch.tensor([codes.shape[2]], dtype=torch.int32)
        return a2ats_core.lut_scores(query.float()[None].contiguous(), self.centroids[layer], codes, lengths)[0]
