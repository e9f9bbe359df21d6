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
    """``bins``: WRoPE distance bins as :class:`a2ats.A2ATSConfig` takes them (None: the
    codebook's, ``Codebook.bins``; 1: the paper's one distance b), laid out by
    :func:`a2ats.codebook.wrope_bins` for ``window`` and ``capacity`` (the model's context); a
    binned selector is named like ``a2ats-8bins``."""

    def __init__(
        self,
        codebook,
        wrope_distance: int | None = None,
        *,
        bins: int | tuple[int, ...] | None = None,
        window: int = 64,
        capacity: int = 8192,
    ):
        self.codebook = codebook
        self.name = {None: "a2ats", "no-wrope": "a2ats-no-wrope", "no-query-awareness": "a2ats-no-qa"}[
            codebook.ablation
        ]
        self.wrope = codebook.ablation != "no-wrope"
        self.wrope_distance = int(wrope_distance or codebook.wrope_distance)
        self.wrope_distances, edges = codebook.scoring_bins(
            bins, window=window, capacity=capacity, wrope_distance=wrope_distance
        )
        self.bin_edges = torch.tensor(edges, dtype=torch.int32) if edges else None
        if edges:
            if not self.wrope:
                raise ValueError("bins: the no-wrope ablation scores keys at their own positions; it has no bins")
            self.name += f"-{len(self.wrope_distances)}bins"
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
            q_dual = book.wrope_dual_queries(layer, query[None], torch.tensor([position]), self.wrope_distances)
        else:
            q_dual = book.dual_queries(layer, query[None]).contiguous()
        codes = self.codes[layer][None]
        lengths = torch.tensor([codes.shape[2]], dtype=torch.int32)
        return a2ats_core.lut_scores(q_dual, book.centroids[layer], codes, lengths, bin_edges=self.bin_edges)[0]
