"""Helpers shared by the native-kernel tests (test_rotary.py, test_vq_encode.py,
test_lut_scores.py, test_select_topk.py, test_pipeline.py, test_paged_pipeline.py): dtypes,
raw-bit views, device sync, strided layouts, the checkers of vq_encode codes and lut_scores
scores against a2ats.reference, and the decode step written as the reference ops in sequence.

Not a test module: the tests import it as ``from kernel_helpers import ...``, the way they
import ``tiny_models`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import torch

import a2ats_core
from a2ats import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor (for bit-exact comparisons of float data)."""
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# Strided layouts of a (B, H, T, D) array: (shape of the base, base -> view).
def x_layouts(B, H, T, D):
    return {
        "contiguous": ((B, H, T, D), lambda a: a),
        "heads_slice": ((B, 2 * H, T, D), lambda a: a[:, 1::2]),
        "tokens_slice": ((B, H, 2 * T + 1, D), lambda a: a[:, :, 1::2]),
        "transposed": ((B, T, H, D), lambda a: a.transpose(1, 2)),
        "row_padded": ((B, H, T, D + 8), lambda a: a[..., :D]),
        "batch_slice": ((2 * B, H, T, D), lambda a: a[1::2]),
    }


LAYOUTS = ["contiguous", "heads_slice", "tokens_slice", "transposed", "row_padded", "batch_slice"]


def check_codes(codes: torch.Tensor, x: torch.Tensor, centroids: torch.Tensor, planted=None, even=None):
    """Native codes are (near-)optimal, agree with the reference, and hit planted centroids."""
    B, Hkv, T, D = x.shape
    _, M, C, dsub = centroids.shape
    codes = codes.cpu()
    assert codes.dtype == torch.int16 and codes.shape == (B, Hkv, T, M)
    assert int(codes.min()) >= 0 and int(codes.max()) < C
    xs = x.double().reshape(B, Hkv, T, M, dsub)
    cent = centroids.double()
    dist = (
        xs.square().sum(-1)[..., None]
        + cent.square().sum(-1)[None, :, None]
        - 2 * torch.einsum("bgtmd,gmcd->bgtmc", xs, cent)
    )  # (B, Hkv, T, M, C), exact enough in f64
    best = dist.min(-1).values
    chosen = dist.gather(-1, codes.long()[..., None])[..., 0]
    # Ties may go either way, but never to a clearly farther centroid.
    slack = 2e-5 * best.abs() + 1e-5
    assert (chosen <= best + slack).all(), f"worst excess {float((chosen - best).max())}"
    ref = reference.vq_encode(x, centroids)
    mismatches = int((ref != codes).sum())
    assert mismatches <= 1 + 0.02 * codes.numel(), f"{mismatches} of {codes.numel()} codes differ from the reference"
    if planted is not None:
        assert torch.equal(codes[:, :, even].long(), planted[:, :, even])


def lut_inputs(B, Hkv, G, D, M, C, Tcap, *, num_bins=None):
    Hq = Hkv * G
    q = torch.randn(B, Hq, D) if num_bins is None else torch.randn(B, Hq, num_bins, D)
    centroids = torch.randn(Hkv, M, C, D // M)
    codes = torch.randint(0, C, (B, Hkv, Tcap, M), dtype=torch.int16)
    return q, centroids, codes


def check_scores(out: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor):
    out = out.cpu()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    for b, length in enumerate(lengths.tolist()):
        assert torch.isfinite(out[b, :, :length]).all()
        assert (out[b, :, length:] == float("-inf")).all(), "scores at and past the length must be -inf"
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def random_codebook(L, Hkv, D, M, C, generator):
    """chol: lower-triangular with a positive diagonal, chol_inv its inverse; random centroids."""
    a = torch.randn(L, Hkv, D, D, generator=generator) / D**0.5
    chol = torch.linalg.cholesky(a @ a.transpose(-1, -2) + 0.5 * torch.eye(D))
    chol_inv = torch.linalg.inv(chol)
    centroids = torch.randn(L, Hkv, M, C, D // M, generator=generator)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    return chol.contiguous(), chol_inv.contiguous(), centroids.contiguous(), inv_freq


class ReferencePipeline:
    """The decode step written as the reference ops in sequence, on a dense copy of the rows."""

    def __init__(
        self, L, B, Hq, Hkv, D, capacity, dtype, book, sink, window, distances, edges, budget_per="query_head"
    ):
        self.chol, self.chol_inv, self.centroids, self.inv_freq = book
        self.budget_per = budget_per
        self.L, self.B, self.Hq, self.Hkv, self.D = L, B, Hq, Hkv, D
        self.sink, self.window, self.distances, self.edges = sink, window, distances, edges
        self.k = torch.zeros(L, B, Hkv, capacity, D, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.codes = torch.zeros(L, B, Hkv, capacity, self.centroids.shape[2], dtype=torch.int16)
        self.lengths = torch.zeros(L, B, dtype=torch.int32)

    def encode(self, layer, keys, positions):
        k_pre = reference.rotary(keys.float(), -positions, self.inv_freq)
        return reference.vq_encode(torch.matmul(k_pre, self.chol[layer]), self.centroids[layer])

    def append(self, layer, keys, values, positions, counts):
        codes = self.encode(layer, keys, positions)
        for b, n in enumerate(counts):
            start = int(self.lengths[layer, b])
            self.k[layer, b, :, start : start + n] = keys[b, :, :n]
            self.v[layer, b, :, start : start + n] = values[b, :, :n]
            self.codes[layer, b, :, start : start + n] = codes[b, :, :n]
            self.lengths[layer, b] += n

    def decode(self, layer, q, keys, values, positions, k, scale, codes=None, selection=None):
        """Output (B, Hq, D). `codes` (the pipeline's) replaces the reference's own when given;
        `selection` (the pipeline's indices, counts) is checked to be a top-k selection of the
        reference scores, up to ties (few centroids make many equal scores), and then used."""
        self.append(layer, keys, values, positions[:, None], [1] * self.B)
        lengths = self.lengths[layer]
        group = self.Hq // self.Hkv
        nb = len(self.distances)
        q32 = q.float()
        rotate = torch.tensor(self.distances)[None, :] - positions[:, None]  # (B, NB)
        q_w = reference.rotary(q32[:, :, None].expand(-1, -1, nb, -1), rotate, self.inv_freq)
        dual = self.chol_inv[layer].repeat_interleave(group, 0)  # (Hq, D, D): q' = L^-1 q_w
        q_dual = torch.einsum("bhjd,hed->bhje", q_w, dual)
        if nb == 1:
            q_dual = q_dual[:, :, 0]
        used = self.codes[layer] if codes is None else codes
        scores = reference.lut_scores(
            q_dual.contiguous(),
            self.centroids[layer],
            used,
            lengths,
            bin_edges=torch.tensor(self.edges, dtype=torch.int32) if nb > 1 else None,
        )
        if self.budget_per == "kv_head":  # one row per KV head, then k of it
            scores = reference.group_scores(scores, lengths, group_size=group, sink=self.sink, window=self.window)
            group = 1
        if selection is None:
            indices, counts = reference.select_topk(
                scores, k, lengths, group_size=group, sink=self.sink, window=self.window
            )
        else:
            indices, counts = selection
            self.check_selection(scores, k, lengths, indices, counts, group)
        rows_k = reference.gather(self.k[layer], indices, counts)
        rows_v = reference.gather(self.v[layer], indices, counts)
        valid = torch.arange(indices.shape[2])[None, None] < counts[..., None]
        out, _ = reference.attend(q32, rows_k, rows_v, valid, scale=scale)
        return out.to(q.dtype), counts

    def check_selection(self, scores, k, lengths, indices, counts, group, eps=1e-5):
        for b in range(self.B):
            n = int(lengths[b])
            lo, hi = self.sink, n - self.window
            for g in range(self.Hkv):
                chosen = set(indices[b, g, : int(counts[b, g])].tolist())
                always = set(range(min(self.sink, n))) | set(range(max(hi, 0), n))
                assert always <= chosen, f"row {b}, KV head {g}: sink or window rows missing"
                middle = chosen - always
                assert all(lo <= t < hi for t in middle) and len(middle) <= group * k
                if hi <= lo:
                    assert not middle
                    continue
                head_scores = scores[b, g * group : (g + 1) * group, lo:hi]  # (G, candidates)
                take = min(k, hi - lo)
                if take == 0:
                    assert not middle
                    continue
                threshold = head_scores.topk(take, dim=-1).values[:, -1:]  # (G, 1): k-th best per head
                must = ((head_scores > threshold + eps).any(0).nonzero().flatten() + lo).tolist()
                may = ((head_scores >= threshold - eps).any(0).nonzero().flatten() + lo).tolist()
                assert set(must) <= middle <= set(may), f"row {b}, KV head {g}: not a top-{k} selection"
                assert len(middle) >= take


class PagedEngine:
    """What a paged engine holds for a2ats_core.PagedPipeline (tests/test_paged_pipeline.py and
    the fuzzer): per layer codes (num_blocks, Hkv, block_size, M), block tables of shuffled blocks,
    a slot-indexed store; and the reference pipeline on the same rows in token order. Requests
    may grow by ``room`` tokens past their prompts. With ``device="cuda"`` the pipeline, codes and
    block table live on the GPU (the store and the reference on the host); engines of the same
    arguments draw the same codebook, tables and rows on every device."""

    def __init__(
        self,
        prompts,
        *,
        G=3,
        dtype=torch.float32,
        budget_per="query_head",
        distances=(64,),
        edges=(),
        L=2,
        Hkv=2,
        D=16,
        M=2,
        C=16,
        sink=4,
        window=8,
        block_size=8,
        room=16,
        seed=None,
        device="cpu",
    ):
        self.L, self.Hkv, self.D, self.M, self.C = L, Hkv, D, M, C
        self.G, self.dtype, self.prompts = G, dtype, list(prompts)
        self.sink, self.window, self.block_size = sink, window, block_size
        self.generator = torch.Generator().manual_seed(len(prompts) * 7 + G if seed is None else seed)
        book = random_codebook(self.L, self.Hkv, self.D, self.M, self.C, self.generator)
        capacity = max(prompts) + room
        self.capacity = capacity
        self.blocks_per_request = -(-capacity // block_size)
        num_blocks = self.blocks_per_request * len(prompts) + 3  # spare blocks nobody uses
        order = torch.randperm(num_blocks, generator=self.generator).to(torch.int32)
        self.device = torch.device(device)
        self.block_table = order[: len(prompts) * self.blocks_per_request].view(len(prompts), -1).contiguous()
        self.block_table = self.block_table.to(self.device)
        self.store = a2ats_core.KVStore(self.L, 1, self.Hkv, self.D, num_blocks * block_size, dtype)
        self.codes = torch.zeros(
            self.L, num_blocks, self.Hkv, block_size, self.M, dtype=torch.int16, device=self.device
        )
        self.pipe = a2ats_core.PagedPipeline(
            self.store,
            num_q_heads=self.Hkv * G,
            inv_freq=book[3],
            chol=book[0],
            chol_inv=book[1],
            centroids=book[2],
            sink=self.sink,
            window=self.window,
            wrope_distances=list(distances),
            bin_edges=list(edges),
            budget_per=budget_per,
            device=str(self.device),
        )
        self.ref = ReferencePipeline(
            self.L, len(prompts), self.Hkv * G, self.Hkv, self.D, capacity, dtype, book, self.sink, self.window,
            list(distances), list(edges), budget_per,
        )  # fmt: skip

    def slots(self, request, tokens):
        table = self.block_table[request].long().cpu()
        return table[tokens // self.block_size] * self.block_size + tokens % self.block_size

    def write(self, layer, request, keys, values, tokens):
        """keys, values (Hkv, n, D) of the request's tokens (n,): rows to the store, codes encoded."""
        slots = self.slots(request, tokens).to(self.device)
        tokens = tokens.to(self.device)
        k, v = (x.transpose(0, 1).contiguous().to(self.device) for x in (keys, values))  # (n, Hkv, D)
        self.store.write_slots(layer, slots, k, v)
        self.pipe.encode(layer, k, tokens, slots, self.codes[layer])

    def prefill(self):
        t = max(self.prompts)
        for layer in range(self.L):
            keys = torch.randn(len(self.prompts), self.Hkv, t, self.D, generator=self.generator).to(self.dtype)
            values = torch.randn(keys.shape, generator=self.generator).to(self.dtype)
            for request, n in enumerate(self.prompts):
                self.write(layer, request, keys[request, :, :n], values[request, :, :n], torch.arange(n))
            self.ref.append(layer, keys, values, torch.arange(t).expand(len(self.prompts), t), self.prompts)

    def token_codes(self, layer):
        """The paged codes of `layer` in token order, (N, Hkv, capacity, M), as the reference holds them."""
        out = torch.zeros_like(self.ref.codes[layer])
        for request in range(len(self.prompts)):
            n = int(self.ref.lengths[layer, request])
            slots = self.slots(request, torch.arange(n))
            codes = self.codes[layer].cpu()
            out[request, :, :n] = codes[slots // self.block_size, :, slots % self.block_size].transpose(0, 1)
        return out

    def step_inputs(self):
        n, Hq = len(self.prompts), self.Hkv * self.G
        q = torch.randn(n, Hq, self.D, generator=self.generator).to(self.dtype)
        keys = torch.randn(n, self.Hkv, 1, self.D, generator=self.generator).to(self.dtype)
        values = torch.randn(n, self.Hkv, 1, self.D, generator=self.generator).to(self.dtype)
        return q, keys, values
