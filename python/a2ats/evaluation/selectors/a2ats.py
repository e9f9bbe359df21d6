"""A²ATS: query-aware codebook codes of the un-rotated keys, scored with the WRoPE query in the
dual space (the same functions the decode path of :class:`~a2ats.A2ATSCache` uses)."""
import torch

from ...cache import dual_queries, encode_keys
from .base import Selector


class A2ATS(Selector):
    name = "a2ats"

    def __init__(self, codebook, wrope_position: int | None = None):
        self.codebook = codebook
        self.wrope_position = int(wrope_position or codebook.relative_position)
        book = codebook
        self.dual = {layer: book.chol_inv[layer].transpose(1, 2).repeat_interleave(book.group_size, 0).contiguous()
                     for layer in book.layers}
        self.codes: dict[int, torch.Tensor] = {}

    def reset(self):
        self.codes.clear()

    def _encode(self, layer, keys, positions):
        book = self.codebook
        return encode_keys(keys[None], positions[None], book.inv_freq, book.chol[layer], book.centroids[layer])[0]

    def prefill(self, layer, keys):
        self.codes[layer] = self._encode(layer, keys, torch.arange(keys.shape[1]))

    def append(self, layer, keys, position):
        self.codes[layer] = torch.cat([self.codes[layer], self._encode(layer, keys, torch.tensor([position]))], 1)

    def scores(self, layer, query, keys, position):
        import a2ats_core

        book = self.codebook
        q_dual = dual_queries(query[None, :, None], torch.tensor([[position]]), self.wrope_position,
                              book.inv_freq, self.dual[layer])
        codes = self.codes[layer][None]
        lengths = torch.tensor([codes.shape[2]], dtype=torch.int32)
        return a2ats_core.lut_scores(q_dual, book.centroids[layer], codes, lengths)[0]
