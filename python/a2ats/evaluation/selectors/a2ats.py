"""A²ATS: query-aware codebook codes of the un-rotated keys, scored with the WRoPE query in the
dual space (the same functions the decode path of :class:`~a2ats.A2ATSCache` uses).

With an ablation codebook (see :attr:`a2ats.Codebook.ablation`) the same selector runs the
ablated method: "no-query-awareness" codebooks have L = I, so nothing else changes;
"no-wrope" codebooks were fitted on post-RoPE keys, so keys are encoded as cached and scored
with the query as the model rotated it.
"""
import torch

import a2ats_core

from ...cache import dual_matrices, dual_queries, encode_keys
from .base import Selector


class A2ATS(Selector):
    def __init__(self, codebook, wrope_position: int | None = None):
        self.codebook = codebook
        self.name = {None: "a2ats", "no-wrope": "a2ats-no-wrope",
                     "no-query-awareness": "a2ats-no-qa"}[codebook.ablation]
        self.wrope = codebook.ablation != "no-wrope"
        self.wrope_position = int(wrope_position or codebook.relative_position)
        book = codebook
        self.dual = {layer: dual_matrices(book.chol_inv[layer], book.group_size) for layer in book.layers}
        self.codes: dict[int, torch.Tensor] = {}

    def reset(self):
        self.codes.clear()

    def _encode(self, layer, keys, positions):
        book = self.codebook
        if not self.wrope:
            return a2ats_core.vq_encode(torch.matmul(keys.float(), book.chol[layer])[None], book.centroids[layer])[0]
        return encode_keys(keys[None], positions[None], book.inv_freq, book.chol[layer], book.centroids[layer])[0]

    def prefill(self, layer, keys):
        self.codes[layer] = self._encode(layer, keys, torch.arange(keys.shape[1]))

    def append(self, layer, keys, position):
        self.codes[layer] = torch.cat([self.codes[layer], self._encode(layer, keys, torch.tensor([position]))], 1)

    def scores(self, layer, query, keys, position):
        book = self.codebook
        if self.wrope:
            q_dual = dual_queries(query[None, :, None], torch.tensor([[position]]), self.wrope_position,
                                  book.inv_freq, self.dual[layer])
        else:
            q_dual = torch.matmul(query.float()[:, None], self.dual[layer])[:, 0][None].contiguous()
        codes = self.codes[layer][None]
        lengths = torch.tensor([codes.shape[2]], dtype=torch.int32)
        return a2ats_core.lut_scores(q_dual, book.centroids[layer], codes, lengths)[0]
