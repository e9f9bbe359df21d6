"""A²ATS: query-aware codebook codes of the un-rotated keys, scored with the WRoPE query in the
dual space (the single native ops that :class:`a2ats_core.Pipeline` fuses, through the codebook's
maths: :meth:`~a2ats.Codebook.encode_keys` and :meth:`~a2ats.Codebook.wrope_dual_queries`).

With an ablation codebook (see :attr:`a2ats.Codebook.ablation`) the same selector runs the
ablated method: "no-query-awareness" codebooks have L = I, so nothing else changes;
"no-wrope" codebooks were fitted on post-RoPE keys, so keys are encoded as cached and scored
with the query as the model rotated it.
"""

import torch

import a2ats_core

from .base import Selector


class A2ATS(Selector):
    def __init__(self, codebook, wrope_distance: int | None = None):
        self.codebook = codebook
        self.name = {None: "a2ats", "no-wrope": "a2ats-no-wrope", "no-query-awareness": "a2ats-no-qa"}[
            codebook.ablation
        ]
        self.wrope = codebook.ablation != "no-wrope"
        self.wrope_distance = int(wrope_distance or codebook.wrope_distance)
        self.codes: dict[int, torch.Tensor] = {}

    def reset(self):
        self.codes.clear()

    def _encode(self, layer, keys, positions):
        book = self.codebook
        if not self.wrope:
            return book.encode(layer, keys[None])[0]
        return book.encode_keys(layer, keys[None], positions[None])[0]

    def prefill(self, layer, keys):
        self.codes[layer] = self._encode(layer, keys, torch.arange(keys.shape[1]))

    def append(self, layer, keys, position):
        self.codes[layer] = torch.cat([self.codes[layer], self._encode(layer, keys, torch.tensor([position]))], 1)

    def scores(self, layer, query, keys, position):
        book = self.codebook
        if self.wrope:
            q_dual = book.wrope_dual_queries(layer, query[None], torch.tensor([position]), self.wrope_distance)
        else:
            q_dual = book.dual_queries(layer, query[None]).contiguous()
        codes = self.codes[layer][None]
        lengths = torch.tensor([codes.shape[2]], dtype=torch.int32)
        return a2ats_core.lut_scores(q_dual, book.centroids[layer], codes, lengths)[0]
