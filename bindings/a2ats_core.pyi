"""Native kernels of a2ats (A²ATS): RoPE, VQ codes, LUT scores, top-K selection and the host KV store.

Type stub of the compiled extension (bindings/*.cpp); tests/test_stub.py keeps it in step with the
module's runtime signatures.

Arrays are any DLPack exporter (torch.Tensor, numpy.ndarray; CPU, or CUDA in a CUDA build). An
output that is not passed (out=None) is allocated by the same framework, on the same device, as the
input it follows, so e.g. rotary(torch.Tensor, ...) returns a torch.Tensor.

Errors: TypeError for an argument that is not a DLPack array, has a dtype or device kind the call
does not take, or a stream that is not an int; ValueError for wrong shapes, strides, devices or
values, and for outputs that share memory with the inputs or with each other (rotary's out=x
excepted). Every check runs before anything is written: a refused call leaves its outputs and the
store as they were. Empty arrays are accepted whatever their strides.
"""

from collections.abc import Sequence
from typing import Any, Protocol, SupportsFloat, SupportsIndex, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

class _DLPackArray(Protocol):
    """Any array exporting DLPack: torch.Tensor, numpy.ndarray, ..."""

    def __dlpack__(self) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...

_A = TypeVar("_A", bound=_DLPackArray)

# A torch dtype (torch.float32, torch.float16, torch.bfloat16) or its name ("float32", "float16",
# "bfloat16"). Typed Any so that this stub needs no torch types.
_DType: TypeAlias = Any
# None or "cpu", "cuda" (the current device), "cuda:N", a device index N, or anything whose str()
# is one of those (torch.device).
_Device: TypeAlias = Any
# A cudaStream_t handle such as torch.cuda.Stream.cuda_stream; None: the current torch stream of a
# torch CUDA input, else the default stream. Ignored for CPU inputs.
_Stream: TypeAlias = int | None
# What pybind11 takes for an int / a float (int, numpy integers, ...; float, numpy floats, ...).
_Int: TypeAlias = SupportsIndex
_Float: TypeAlias = SupportsFloat | SupportsIndex

__version__: str

def built_with_cuda() -> bool:
    """Whether the CUDA kernels were compiled in."""

def cuda_device_count() -> int:
    """CUDA devices visible to this process (0 without CUDA or a driver)."""

def num_threads() -> int:
    """Threads the CPU kernels use (A2ATS_NUM_THREADS or the core count)."""

def isa() -> str:
    """The ISA level the CPU kernels' hot loops run at: "baseline" (x86-64), "avx2" (x86-64-v3) or
    "avx512" (x86-64-v4). A2ATS_ISA picks it at import; by default the best the CPU supports."""

def supported_isas() -> list[str]:
    """ISA levels this CPU and build support, lowest first (only "baseline" off x86-64 Linux with GCC)."""

def set_isa(isa: str) -> None:
    """Run later CPU kernel calls at ISA level `isa` (see isa()); ValueError for a level the CPU lacks.

    For tests and diagnostics: results may differ in the last bits between levels (FMA contraction).
    """

def rotary(
    x: _A,
    positions: _DLPackArray,
    inv_freq: _DLPackArray,
    *,
    interleaved: bool = False,
    out: _A | None = None,
    stream: _Stream = None,
) -> _A:
    """Rotate x (batch, num_heads, tokens, head_dim) f32/f16/bf16 by positions (batch, tokens)
    int32/int64 (may be negative) with inv_freq (R/2,) f32 contiguous.

    Dims >= R pass through. Pairs are (x[i], x[i + R/2]) as in transformers' rotate_half, or
    (x[2i], x[2i+1]) when interleaved. Math in f32. Returns out (batch, num_heads, tokens, head_dim)
    of x's dtype; out may be x itself (in place). TypeError for a wrong dtype, ValueError for a
    wrong shape (head_dim <= the kernels' maximum, R <= head_dim) or device.
    """

def vq_encode(x: _A, centroids: _DLPackArray, *, out: _A | None = None, stream: _Stream = None) -> _A:
    """Codes (B, Hkv, T, M) int16 of whitened keys x (B, Hkv, T, D) f32/f16/bf16 under centroids
    (Hkv, M, C, D/M) f32 contiguous (C fits int16).

    Returns out. TypeError for a wrong dtype, ValueError for a wrong shape or device.
    """

def lut_scores(
    q: _A,
    centroids: _DLPackArray,
    codes: _DLPackArray,
    lengths: _DLPackArray,
    *,
    bin_edges: _DLPackArray | None = None,
    block_table: _DLPackArray | None = None,
    out: _A | None = None,
    stream: _Stream = None,
) -> _A:
    """Approximate scores (B, Hq, Tcap) f32 from codes (B, Hkv, Tcap, M) int16.

    q (B, Hq, D) f32 in the dual space, or (B, Hq, NB, D) with bin_edges (NB - 1,) int32 ascending:
    token n of row b at distance d = lengths[b] - 1 - n uses bin j = #{edges <= d}. centroids
    (Hkv, M, C, D/M) f32; lengths (B,) int32. Scores are -inf at and past each length. Returns out.
    TypeError for a wrong dtype; ValueError for a wrong shape, device or value: a code outside
    [0, C) raises ValueError on CPU inputs, and on CUDA inputs gives that token a NaN score, which
    select_topk ranks lowest.

    Paged (vLLM's cache layout): codes (num_blocks, Hkv, block_size, M) and block_table
    (B, max_blocks) int32; token n of row b lies in block block_table[b, n // block_size] and
    Tcap = max_blocks * block_size. Entries past a row's length are never read; a block id outside
    [0, num_blocks) below it is refused (CPU) or gives NaN scores (CUDA), as a bad code.
    """

def select_topk(
    scores: _A,
    k: _Int,
    lengths: _DLPackArray,
    *,
    group_size: _Int,
    sink: _Int,
    window: _Int,
    add_resident: bool = True,
    out_indices: _A | None = None,
    out_counts: _A | None = None,
    stream: _Stream = None,
) -> tuple[_A, _A]:
    """Rows to attend over: (indices (B, Hkv, G*k + sink + window) int32 ascending, padded with -1;
    counts (B, Hkv) int32), from scores (B, Hq, Tcap) f32 and lengths (B,) int32.

    Hkv = Hq / group_size. Per query head the top k of tokens [sink, length - window) (all when
    fewer), united over the group_size heads of each KV head, plus the first sink and last window
    tokens. add_resident=False leaves those out (indices (B, Hkv, G*k)): for a caller that holds
    the sink and window rows itself. TypeError for a wrong dtype, ValueError for a wrong shape,
    device or value (k, sink, window >= 0; group_size divides Hq).
    """

def group_scores(
    scores: _A,
    lengths: _DLPackArray,
    *,
    group_size: _Int,
    sink: _Int,
    window: _Int,
    out: _A | None = None,
    stream: _Stream = None,
) -> _A:
    """One score row per KV head, (B, Hkv, Tcap) f32, for a per-KV-head budget.

    scores (B, Hq, Tcap) f32, lengths (B,) int32. out[b, g, t] = max over the group_size query
    heads h of KV head g of log softmax_h(t), softmax_h over the candidates [sink, length - window)
    of scores[b, h]; -inf outside the candidates, NaN scores ignored. select_topk(out, k, lengths,
    group_size=1, ...) then reads exactly k middle rows per KV head. TypeError for a wrong dtype,
    ValueError for a wrong shape, device or value (sink, window >= 0; group_size divides Hq).
    """

class KVStore:
    """Host-memory K/V store (num_layers, batch, num_kv_heads, capacity, head_dim).

    pinned uses page-locked memory when a CUDA device is usable (see .pinned); threads is the size
    of the store's own pool, which runs its append, gather and attend work (0 = one per core, at
    most 1024). Thread safety: every method holds the store's lock for the whole call; calls on one
    store run one at a time. A store owned by a Pipeline refuses append and reset (ValueError).
    """

    def __init__(
        self,
        num_layers: _Int,
        batch: _Int,
        num_kv_heads: _Int,
        head_dim: _Int,
        capacity: _Int,
        dtype: _DType,
        *,
        pinned: bool = True,
        threads: _Int = 0,
    ) -> None:
        """dtype: a torch dtype or "float32" / "float16" / "bfloat16" (TypeError otherwise).
        ValueError for sizes < 1, capacity past int32, threads outside [0, 1024] or a store too
        large to allocate."""

    def append(
        self,
        layer: _Int,
        k: _DLPackArray,
        v: _DLPackArray,
        *,
        num_tokens: _DLPackArray | None = None,
        stream: _Stream = None,
    ) -> None:
        """Append k, v (B, Hkv, t, D) of the store's dtype (CPU or CUDA) to `layer`; num_tokens (B,)
        int32 (CPU) appends only the first num_tokens[b] of the t rows of batch row b.

        Raises ValueError, storing nothing, on capacity overflow; TypeError for a wrong dtype.
        """

    def gather(
        self,
        layer: _Int,
        indices: _DLPackArray,
        counts: _DLPackArray,
        out_k: _DLPackArray,
        out_v: _DLPackArray,
        *,
        stream: _Stream = None,
    ) -> None:
        """Copy rows indices[b, g, :counts[b, g]] of `layer` into out_k, out_v (B, Hkv, Kmax, D) of
        the store's dtype; slots past counts are untouched. indices (B, Hkv, Kmax) int32, counts
        (B, Hkv) int32. B is the store's batch, or any number of query rows on a store of batch 1
        (CPU outputs), each reading its own row list. ValueError for an index out of the stored
        rows or a wrong shape."""

    def attend(
        self,
        layer: _Int,
        q: _A,
        indices: _DLPackArray,
        counts: _DLPackArray,
        *,
        scale: _Float,
        out: _A | None = None,
        out_lse: _A | None = None,
    ) -> tuple[_A, _A]:
        """Exact attention over the selected rows of `layer`, read straight from the store (CPU
        only; no gathered copy).

        q (B, Hq, D) float32 with Hq a multiple of num_kv_heads (head h reads KV head
        h // (Hq / Hkv)); indices (B, Hkv, Kmax) int32 and counts (B, Hkv) int32 as for gather.
        Returns (out, lse): out (B, Hq, D) float32 = softmax(scale * q K_S^T) V_S over
        S = indices[b, g, :counts[b, g]], and lse (B, Hq) float32 = log sum exp(scale * q K_S^T);
        a row with no selected rows gives out = 0 and lse = -inf. On a store of batch 1, B may be
        any number of queries, each over its own row list (an engine's requests over slot ids).
        ValueError for CUDA arrays.
        """

    def write_slots(
        self, layer: _Int, slots: _DLPackArray, k: _DLPackArray, v: _DLPackArray, *, stream: _Stream = None
    ) -> None:
        """Slot-indexed write into a store of batch 1 whose capacity is an engine's number of slots:
        row i of k, v (N, Hkv, D) of the store's dtype (CPU or CUDA, last dim contiguous) goes to
        slot slots[i] of `layer`; slots (N,) int64 on the CPU or on k's device, a slot < 0 skips
        its row. The length becomes the highest slot written + 1. ValueError, writing nothing, for
        a slot >= capacity or one named twice; TypeError for a wrong dtype. From CUDA rows it
        returns once they are in the store."""

    def lengths(self) -> npt.NDArray[np.int64]:
        """Rows stored, (num_layers, batch) int64 (a numpy copy)."""

    def reset(self) -> None:
        """Forget all rows (lengths to 0); memory is kept."""

    @property
    def nbytes(self) -> int:
        """Bytes of K and V memory."""

    @property
    def pinned(self) -> bool:
        """Whether the memory is page-locked."""

    @property
    def num_layers(self) -> int: ...
    @property
    def batch(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def capacity(self) -> int:
        """Rows per (layer, batch row, KV head)."""

    @property
    def dtype(self) -> str:
        """ "float32", "float16" or "bfloat16"."""

    @property
    def num_threads(self) -> int:
        """Threads of the store's own pool."""

class Pipeline:
    """The A²ATS decode step of a model as one native call per layer (CPU or CUDA).

    Owns `store` (from then on only the pipeline changes it) and keeps a code for every stored key.
    Per step: plan(k) once, then decode(layer, ...) for every layer. Thread safety: every method
    holds the store's lock for the whole call; share one pipeline only to read it (stats, codes)
    while another thread decodes.
    """

    def __init__(
        self,
        store: KVStore,
        *,
        num_q_heads: _Int,
        inv_freq: _DLPackArray,
        chol: _DLPackArray,
        chol_inv: _DLPackArray,
        centroids: _DLPackArray,
        sink: _Int,
        window: _Int,
        wrope_distances: Sequence[_Int],
        bin_edges: Sequence[_Int] = (),
        interleaved: bool = False,
        budget_per: str = "query_head",
        device: _Device = None,
    ) -> None:
        """Codebook arrays are float32 CPU contiguous, copied (to the device on CUDA): inv_freq
        (R/2,); chol, chol_inv (L, Hkv, D, D) with whitened = k_pre @ chol[l, g] and chol_inv =
        chol^-1; centroids (L, Hkv, M, C, D/M). WRoPE: far tokens are scored at distance
        wrope_distances[j] of their bin j = #{bin_edges <= d} (d = length - 1 - n).

        budget_per: "query_head" selects k middle rows per query head, united per KV head (the
        paper's; a KV head reads up to G k), "kv_head" selects k per KV head from group_scores of
        its query heads (reads exactly k).

        device: None or "cpu" attends the selected rows straight from the host store; "cuda",
        "cuda:N" or N keeps codes and sink/window rows on that GPU and takes every array of
        prefill/decode on that device (num_tokens stays on the host). ValueError for an unusable
        device, a store another Pipeline owns, or wrong shapes and values.
        """

    def prefill(
        self,
        layer: _Int,
        k: _DLPackArray,
        v: _DLPackArray,
        positions: _DLPackArray,
        *,
        num_tokens: _DLPackArray | None = None,
        stream: _Stream = None,
    ) -> None:
        """Store the first num_tokens[b] ((B,) int32 on the host; all when None) rows of k, v
        (B, Hkv, t, D) of the store's dtype of each batch row, keys post-RoPE at positions (B, t)
        int64, and encode them: un-rotated, whitened, nearest centroid."""

    def plan(self, k: _Int) -> None:
        """Start a decode step selecting k middle rows per query head in every layer.

        Raises ValueError when the layers hold different rows (an earlier step stopped partway:
        reset()) or a row is full.
        """

    def decode(
        self,
        layer: _Int,
        q: _A,
        k: _DLPackArray,
        v: _DLPackArray,
        positions: _DLPackArray,
        *,
        scale: _Float,
        out: _A | None = None,
        stream: _Stream = None,
    ) -> _A:
        """One decode step of `layer` -> out (B, Hq, D) of the store's dtype.

        q (B, Hq, D), k, v (B, Hkv, 1, D) of the store's dtype, post-RoPE at positions (B,) int64.
        Appends and encodes the new row, scores every row from the codes with the WRoPE dual query,
        selects the top k per query head (united per KV head) plus the sink and window rows, and
        attends exactly over them with q, softmax in float32.
        """

    def codes(self, layer: _Int) -> npt.NDArray[np.int16]:
        """Codes (B, Hkv, capacity, M) int16 of `layer` (a numpy copy)."""

    def last_selection(self) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """(indices (B, Hkv, Kmax) int32, counts (B, Hkv) int32) the last decode call attended over
        (numpy copies). On CUDA only the middle rows (Kmax = G * k): the sink and window rows are
        resident on the device. ValueError before the first decode."""

    def stats(self) -> dict[str, int]:
        """Counters: decode_calls, rows_read, rows_fetched, rows_cached."""

    def reset(self) -> None:
        """Forget every row (the store's too) and the current plan."""

    @property
    def store(self) -> KVStore:
        """The KVStore this pipeline owns."""

    @property
    def device(self) -> str:
        """ "cpu" or "cuda:N"."""

    @property
    def num_bins(self) -> int:
        """WRoPE distance bins (len(wrope_distances))."""

    @property
    def planned_k(self) -> int:
        """k of the last plan(k) (0 before the first)."""

    @property
    def num_q_heads(self) -> int: ...
    @property
    def budget_per(self) -> str:
        """ "query_head" or "kv_head" (see __init__)."""

class PagedPipeline:
    """The A²ATS decode step over a serving engine's paged cache, one native call per layer (CPU or CUDA).

    `store` is a slot-indexed KVStore (batch 1, capacity = the engine's slots) whose rows the
    engine writes with write_slots; it stays an ordinary store. The codes are the engine's: every
    call takes codes (num_blocks, Hkv, block_size, M) int16, the paged cache of the layer, where
    token t of a request lies at slot block_table[t // block_size] * block_size + t % block_size,
    as its K/V rows do in the store. Every method holds the store's lock for the whole call.
    On CUDA, k, q, positions, slots, codes, block_table and out live on the pipeline's device,
    lengths and the budgets k on the host; each decode call gathers its selected rows from the
    (pinned) store with one host synchronisation.
    """

    def __init__(
        self,
        store: KVStore,
        *,
        num_q_heads: _Int,
        inv_freq: _DLPackArray,
        chol: _DLPackArray,
        chol_inv: _DLPackArray,
        centroids: _DLPackArray,
        sink: _Int,
        window: _Int,
        wrope_distances: Sequence[_Int],
        bin_edges: Sequence[_Int] = (),
        interleaved: bool = False,
        budget_per: str = "query_head",
        device: _Device = None,
    ) -> None:
        """The codebook and device as Pipeline takes them. ValueError for a store of batch > 1, or
        wrong shapes and values."""

    def encode(
        self,
        layer: _Int,
        k: _DLPackArray,
        positions: _DLPackArray,
        slots: _DLPackArray,
        codes: _DLPackArray,
        *,
        stream: _Stream = None,
    ) -> None:
        """Encode keys k (n, Hkv, D) of the store's dtype, post-RoPE at positions (n,) int64
        (un-rotated, whitened, nearest centroid), into `codes` at slots (n,) int64; a negative
        slot skips its key. Checked first: a refused call writes no code."""

    def decode(
        self,
        layer: _Int,
        q: _A,
        codes: _DLPackArray,
        lengths: _DLPackArray,
        block_table: _DLPackArray,
        k: _DLPackArray,
        *,
        scale: _Float,
        out: _A | None = None,
        stream: _Stream = None,
    ) -> _A:
        """One decode step of `layer` for N requests -> out (N, Hq, D) of the store's dtype.

        q (N, Hq, D) post-RoPE at position lengths[i] - 1; lengths (N,) int32 tokens in context,
        the new one included (its row already in the store, its code encoded); block_table
        (N, max_blocks) int32 contiguous; k (N,) int32 the middle rows each request selects per
        query head (per KV head with budget_per="kv_head"). Scores every context token from the
        paged codes with the WRoPE dual query, selects the top k plus the sink and window rows,
        and attends exactly over those slots of the store, softmax in float32.
        """

    def last_selection(self) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """(indices (N, Hkv, Kmax) int32, counts (N, Hkv) int32) the last decode call attended
        over, as token indices of each request (not slots; numpy copies)."""

    def stats(self) -> dict[str, int]:
        """Counters: decode_calls, rows_read, rows_fetched, rows_cached."""

    @property
    def store(self) -> KVStore:
        """The slot-indexed KVStore the pipeline reads."""

    @property
    def device(self) -> str:
        """ "cpu" or "cuda:N"."""

    @property
    def num_bins(self) -> int:
        """WRoPE distance bins (len(wrope_distances))."""

    @property
    def num_q_heads(self) -> int: ...
    @property
    def budget_per(self) -> str:
        """ "query_head" or "kv_head"."""
