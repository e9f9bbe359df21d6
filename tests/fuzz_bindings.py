"""Seeded fuzzing of every a2ats_core binding against python/a2ats/reference.py.

    python tests/fuzz_bindings.py --calls 10000 --seed 0

Each call is drawn valid or, half the time, broken by one mutation (wrong dtype, rank, shape,
stride, device-free kind of object, value range, overlapping output, size overflow). Checked:

* a valid call equals the reference (the KV store against a torch copy of what was appended);
* an invalid call raises TypeError or ValueError whose message names the broken argument;
* a rejected call changes nothing: its inputs, the ``out=`` arrays it was given (filled with a
  sentinel) and the store's rows and lengths keep their bytes.

Prints one JSON object (calls per binding, valid and invalid) and exits 0, or prints the first
failures and exits 1. A crash kills this process, not the caller: tests/test_fuzz.py runs it in a
subprocess so that a segfault fails a test instead of ending pytest.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys

import numpy as np
import torch

import a2ats_core
from a2ats import reference

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
SENTINEL = 7.25


class Mismatch(AssertionError):
    pass


def bits(t):
    t = t.detach().contiguous()
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()
    return t.clone()


def strided(rng: random.Random, shape, dtype, make=torch.randn):
    """A tensor of `shape`, sometimes a view into a larger one (strided batch/head/token dims)."""
    if rng.random() < 0.5 or len(shape) < 2:
        return make(*shape).to(dtype) if make is torch.randn else make(shape).to(dtype)
    pad = [s + rng.randint(0, 2) for s in shape[:-1]] + [shape[-1] + rng.choice([0, 0, 3])]
    big = make(*pad).to(dtype) if make is torch.randn else make(pad).to(dtype)
    return big[tuple(slice(0, s) for s in shape)]


def tolerance(dtype):
    return {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


# ----------------------------------------------------------------------------- mutations
# A mutation takes the call's kwargs and returns (kwargs, names the error may cite) or None when it
# does not apply to this draw. Every one must make the call invalid.


def wrong_dtype(name, allowed):
    def mutate(rng, kw):
        if not isinstance(kw.get(name), torch.Tensor):
            return None
        choices = [
            d
            for d in (
                torch.float32,
                torch.float16,
                torch.float64,
                torch.int16,
                torch.int32,
                torch.int64,
                torch.uint8,
                torch.bool,
            )
            if d not in allowed
        ]
        kw[name] = kw[name].to(rng.choice(choices))
        return kw, {name}

    return mutate


def extra_dims(name):
    def mutate(rng, kw):
        if not isinstance(kw.get(name), torch.Tensor):
            return None
        kw[name] = kw[name][None, None]
        return kw, {name}

    return mutate


def resized(name, dim, partners=()):
    """Dimension `dim` of `name` one larger (or smaller) than the shapes it must agree with."""

    def mutate(rng, kw):
        t = kw.get(name)
        if not isinstance(t, torch.Tensor) or t.dim() <= dim:
            return None
        shape = list(t.shape)
        shape[dim] = shape[dim] + 1 if shape[dim] == 0 or rng.random() < 0.5 else shape[dim] - 1
        kw[name] = torch.zeros(shape, dtype=t.dtype)
        return kw, {name, *partners}

    return mutate


def not_an_array(name):
    def mutate(rng, kw):
        if name not in kw:
            return None
        kw[name] = rng.choice([[1, 2, 3], 3.5, "x", None if kw[name] is not None else object()])
        if kw[name] is None:
            return None
        return kw, {name}

    return mutate


def last_dim_strided(name):
    def mutate(rng, kw):
        t = kw.get(name)
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[-1] < 2 or t.numel() == 0:
            return None
        kw[name] = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)[..., ::2]
        return kw, {name}

    return mutate


def negative_stride(name):
    def mutate(rng, kw):
        t = kw.get(name)
        if not isinstance(t, torch.Tensor) or t.numel() < 2 or t.dtype == torch.bfloat16:
            return None
        dims = [d for d in range(t.dim()) if t.shape[d] > 1]
        array = np.ascontiguousarray(t.numpy())
        kw[name] = np.flip(array, axis=rng.choice(dims))
        return kw, {name}

    return mutate


def overlapping(name, source):
    """`name` (an output) made a view of the input `source`'s memory."""

    def mutate(rng, kw):
        src = kw.get(source)
        shape = kw.get("_shape_" + name)
        if shape is None or not isinstance(src, torch.Tensor) or src.numel() == 0:
            return None
        dtype = kw["_dtype_" + name]
        need = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        raw = src.detach().view(-1).view(torch.uint8) if src.is_contiguous() else None
        if raw is None or raw.numel() < need or need == 0:
            return None
        kw[name] = raw[:need].view(dtype).view(shape)
        return kw, {name}

    return mutate


def set_value(name, value, cite):
    def mutate(rng, kw):
        if name not in kw:
            return None
        kw[name] = value(rng, kw) if callable(value) else value
        if kw[name] is None:
            return None
        return kw, set(cite)

    return mutate


def poke(name, value, cite, where=None):
    """One element of integer tensor `name` set to value(rng, kw); `where` picks which element."""

    def mutate(rng, kw):
        t = kw.get(name)
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return None
        index = where(rng, kw) if where else tuple(rng.randrange(s) for s in t.shape)
        if index is None:
            return None
        v = value(rng, kw) if callable(value) else value
        t = t.clone()
        t[index] = v
        kw[name] = t
        return kw, set(cite)

    return mutate


# ----------------------------------------------------------------------------- bindings


def draw_rotary(rng):
    B, H, T = rng.randint(0, 3), rng.randint(1, 4), rng.randint(0, 6)
    D = rng.choice([2, 4, 8, 16, 18])
    R = 2 * rng.randint(1, D // 2)
    dtype = rng.choice(FLOATS)
    kw = dict(
        x=strided(rng, (B, H, T, D), dtype),
        positions=torch.randint(-300, 300, (B, T), dtype=rng.choice([torch.int32, torch.int64])),
        inv_freq=torch.rand(R // 2),
        interleaved=rng.random() < 0.5,
    )
    if rng.random() < 0.5:
        kw["out"] = torch.full((B, H, T, D), SENTINEL, dtype=dtype)
    kw["_shape_out"], kw["_dtype_out"] = (B, H, T, D), dtype

    def check(kw, result):
        want = reference.rotary(kw["x"], kw["positions"], kw["inv_freq"], interleaved=kw["interleaved"])
        tol = tolerance(dtype)
        torch.testing.assert_close(result.float(), want.float(), rtol=tol, atol=tol)

    mutations = [
        wrong_dtype("x", FLOATS),
        wrong_dtype("positions", [torch.int32, torch.int64]),
        wrong_dtype("inv_freq", [torch.float32]),
        extra_dims("x"),
        extra_dims("positions"),
        resized("positions", 0, {"x"}),
        resized("positions", 1, {"x"}),
        resized("out", 2, {"x"}),
        not_an_array("x"),
        not_an_array("inv_freq"),
        last_dim_strided("x"),
        negative_stride("x"),
        set_value("inv_freq", lambda rng, kw: torch.rand(kw["x"].shape[3] // 2 + 1), {"inv_freq"}),
    ]
    return a2ats_core.rotary, kw, check, mutations


def draw_vq_encode(rng):
    B, Hkv, T = rng.randint(0, 3), rng.randint(1, 3), rng.randint(0, 7)
    M = rng.choice([1, 2])
    D = M * rng.choice([2, 4, 8, 16])
    C = rng.choice([1, 3, 16, 64])
    dtype = rng.choice(FLOATS)
    centroids = torch.randn(Hkv, M, C, D // M)
    kw = dict(x=strided(rng, (B, Hkv, T, D), dtype), centroids=centroids)
    if rng.random() < 0.5:
        kw["out"] = torch.full((B, Hkv, T, M), 77, dtype=torch.int16)
    kw["_shape_out"], kw["_dtype_out"] = (B, Hkv, T, M), torch.int16

    def check(kw, result):
        want = reference.vq_encode(kw["x"], centroids)
        x = kw["x"].float().reshape(B, Hkv, T, M, D // M)

        def dist(codes):
            chosen = torch.stack([centroids[g, m][codes[:, g, :, m].long()] for g in range(Hkv) for m in range(M)], 2)
            chosen = chosen.reshape(B, T, Hkv, M, D // M).permute(0, 2, 1, 3, 4)
            return ((x - chosen) ** 2).sum(-1)

        if B * T:
            got_d, want_d = dist(result), dist(want)
            if not bool((got_d <= want_d + 1e-3 * (1 + want_d)).all()):
                raise Mismatch("vq_encode chose a farther centroid than the reference")

    mutations = [
        wrong_dtype("x", FLOATS),
        wrong_dtype("centroids", [torch.float32]),
        extra_dims("x"),
        resized("centroids", 0, {"centroids", "x"}),
        resized("centroids", 3, {"centroids"}),
        resized("out", 3, {"out"}),
        not_an_array("centroids"),
        last_dim_strided("x"),
        last_dim_strided("centroids"),
        overlapping("out", "x"),
        negative_stride("x"),
    ]
    return a2ats_core.vq_encode, kw, check, mutations


def draw_lut_scores(rng):
    B, Hkv, G = rng.randint(0, 3), rng.randint(1, 3), rng.choice([1, 2, 3, 7])
    M = rng.choice([1, 2])
    D = M * rng.choice([2, 4, 8])
    C, Tcap, NB = rng.choice([1, 5, 16]), rng.randint(0, 20), rng.choice([1, 1, 2, 3])
    centroids = torch.randn(Hkv, M, C, D // M)
    q_shape = (B, Hkv * G, NB, D) if NB > 1 or rng.random() < 0.2 else (B, Hkv * G, D)
    kw = dict(
        q=strided(rng, q_shape, torch.float32),
        centroids=centroids,
        codes=strided(rng, (B, Hkv, Tcap, M), torch.int16, make=lambda s: torch.randint(0, C, s)),
        lengths=torch.randint(0, Tcap + 1, (B,), dtype=torch.int32),
    )
    if len(q_shape) == 4:
        kw["bin_edges"] = torch.sort(torch.randint(0, Tcap + 2, (q_shape[2] - 1,))).values.to(torch.int32)
    if rng.random() < 0.5:
        kw["out"] = torch.full((B, Hkv * G, Tcap), SENTINEL)
    kw["_shape_out"], kw["_dtype_out"] = (B, Hkv * G, Tcap), torch.float32

    def check(kw, result):
        want = reference.lut_scores(kw["q"], centroids, kw["codes"], kw["lengths"], bin_edges=kw.get("bin_edges"))
        torch.testing.assert_close(result, want, rtol=1e-4, atol=1e-4)

    def valid_token(rng, kw):
        rows = [b for b in range(B) if int(kw["lengths"][b]) > 0]
        if not rows:
            return None
        b = rng.choice(rows)
        return b, rng.randrange(Hkv), rng.randrange(int(kw["lengths"][b])), rng.randrange(M)

    mutations = [
        wrong_dtype("q", [torch.float32]),
        wrong_dtype("codes", [torch.int16]),
        wrong_dtype("lengths", [torch.int32]),
        resized("codes", 0, {"codes", "q"}),
        resized("codes", 3, {"codes"}),
        resized("lengths", 0, {"lengths"}),
        resized("out", 2, {"out"}),
        poke("codes", lambda rng, kw: rng.choice([C, C + 1, 32767, -1, -32768]), {"codes"}, valid_token),
        poke("lengths", lambda rng, kw: rng.choice([Tcap + 1, -1, 2**31 - 1]), {"lengths"}),
        set_value("q", lambda rng, kw: torch.randn(B, Hkv * G + 1, D) if Hkv > 1 else None, {"q", "codes"}),
        last_dim_strided("codes"),
        last_dim_strided("q"),
        not_an_array("codes"),
        overlapping("out", "q"),
        overlapping("out", "centroids"),
        negative_stride("codes"),
    ]
    if NB > 2:
        mutations.append(
            set_value(
                "bin_edges",
                lambda rng, kw: (
                    kw["bin_edges"].flip(0) if int(kw["bin_edges"][0]) != int(kw["bin_edges"][-1]) else None
                ),
                {"bin_edges"},
            )
        )
    if NB > 1:
        mutations.append(set_value("bin_edges", lambda rng, kw: torch.zeros(NB, dtype=torch.int32), {"bin_edges"}))
    return a2ats_core.lut_scores, kw, check, mutations


def draw_select_topk(rng):
    B, Hkv, G, Tcap = rng.randint(0, 3), rng.randint(1, 3), rng.choice([1, 2, 3, 7]), rng.randint(0, 40)
    k, sink, window = rng.randint(0, 12), rng.randint(0, 6), rng.randint(0, 10)
    scores = strided(rng, (B, Hkv * G, Tcap), torch.float32)
    kw = dict(
        scores=scores,
        k=k,
        lengths=torch.randint(0, Tcap + 1, (B,), dtype=torch.int32),
        group_size=G,
        sink=sink,
        window=window,
    )
    kmax = G * k + sink + window
    if rng.random() < 0.5:
        kw["out_indices"] = torch.full((B, Hkv, kmax), 99, dtype=torch.int32)
        kw["out_counts"] = torch.full((B, Hkv), 99, dtype=torch.int32)
    kw["_shape_out_indices"], kw["_dtype_out_indices"] = (B, Hkv, kmax), torch.int32

    def check(kw, result):
        indices, counts = result
        want_indices, want_counts = reference.select_topk(
            scores, k, kw["lengths"], group_size=G, sink=sink, window=window
        )
        if not (torch.equal(counts, want_counts) and torch.equal(indices, want_indices)):
            raise Mismatch("select_topk differs from the reference")

    mutations = [
        wrong_dtype("scores", [torch.float32]),
        wrong_dtype("lengths", [torch.int32]),
        extra_dims("scores"),
        resized("lengths", 0, {"lengths"}),
        resized("out_counts", 1, {"out_counts"}),
        set_value("k", lambda rng, kw: rng.choice([-1, 2**31, 2**62]), {"k", "group_size"}),
        set_value("sink", lambda rng, kw: rng.choice([-1, 2**40]), {"sink", "group_size"}),
        set_value("window", lambda rng, kw: rng.choice([-5, 2**62]), {"window", "group_size"}),
        set_value("group_size", lambda rng, kw: rng.choice([0, -1, Hkv * G + 1]) if Hkv * G > 1 else 0, {"group_size"}),
        poke("lengths", lambda rng, kw: rng.choice([Tcap + 1, -1]), {"lengths"}),
        last_dim_strided("scores"),
        not_an_array("scores"),
        overlapping("out_indices", "scores"),
    ]
    return a2ats_core.select_topk, kw, check, mutations


def draw_group_scores(rng):
    B, Hkv, G, Tcap = rng.randint(0, 3), rng.randint(1, 3), rng.choice([1, 2, 3, 7]), rng.randint(0, 40)
    sink, window = rng.randint(0, 6), rng.randint(0, 10)
    scores = strided(rng, (B, Hkv * G, Tcap), torch.float32)
    kw = dict(
        scores=scores,
        lengths=torch.randint(0, Tcap + 1, (B,), dtype=torch.int32),
        group_size=G,
        sink=sink,
        window=window,
    )
    if rng.random() < 0.5:
        kw["out"] = torch.full((B, Hkv, Tcap), 99.0)
    kw["_shape_out"], kw["_dtype_out"] = (B, Hkv, Tcap), torch.float32

    def check(kw, result):
        want = reference.group_scores(scores, kw["lengths"], group_size=G, sink=sink, window=window)
        finite = want.isfinite()
        if not (
            torch.equal(result.isfinite(), finite)
            and torch.allclose(result[finite], want[finite], rtol=1e-6, atol=4e-6)
            and torch.equal(result[~finite], want[~finite])
        ):
            raise Mismatch("group_scores differs from the reference")

    mutations = [
        wrong_dtype("scores", [torch.float32]),
        wrong_dtype("lengths", [torch.int32]),
        extra_dims("scores"),
        resized("lengths", 0, {"lengths"}),
        resized("out", 1, {"out"}),
        set_value("sink", lambda rng, kw: -1, {"sink"}),
        set_value("window", lambda rng, kw: -5, {"window"}),
        set_value("group_size", lambda rng, kw: rng.choice([0, -1, Hkv * G + 1]) if Hkv * G > 1 else 0, {"group_size"}),
        poke("lengths", lambda rng, kw: rng.choice([Tcap + 1, -1]), {"lengths"}),
        last_dim_strided("scores"),
        not_an_array("scores"),
        overlapping("out", "scores"),
    ]
    return a2ats_core.group_scores, kw, check, mutations


BINDINGS = {
    "rotary": draw_rotary,
    "vq_encode": draw_vq_encode,
    "lut_scores": draw_lut_scores,
    "select_topk": draw_select_topk,
    "group_scores": draw_group_scores,
}


def expect_rejected(call, cite, watched_before, watched_now, what):
    try:
        call()
    except (TypeError, ValueError) as error:
        message = str(error)
        if not any(re.search(rf"\b{re.escape(name)}\b", message) for name in cite):
            raise Mismatch(f"{what}: the error names none of {sorted(cite)}: {message}")
    except Exception as error:  # noqa: BLE001 - any other type is the defect being looked for
        raise Mismatch(f"{what}: raised {type(error).__name__} instead of TypeError/ValueError: {error}")
    else:
        raise Mismatch(f"{what}: an invalid call ({sorted(cite)}) was accepted")
    for name, old in watched_before.items():
        if not torch.equal(old, watched_now()[name]):
            raise Mismatch(f"{what}: the rejected call changed {name}")


def fuzz_function(rng, name):
    fn, kw, check, mutations = BINDINGS[name](rng)
    invalid, cite = False, None
    if rng.random() < 0.5:
        for _ in range(20):
            attempt = rng.choice(mutations)(rng, dict(kw))
            if attempt is not None:
                (kw, cite), invalid = attempt, True
                break
    args = {k: v for k, v in kw.items() if not k.startswith("_")}
    tensors = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}

    def snapshot():
        return {k: bits(v) for k, v in tensors.items()}

    if invalid:
        expect_rejected(lambda: fn(**args), cite, snapshot(), snapshot, name)
    else:
        check(args, fn(**args))
    return invalid


# ----------------------------------------------------------------------------- KVStore


class StoreModel:
    """A KVStore and a torch copy of what it should hold."""

    def __init__(self, rng):
        self.L, self.B, self.Hkv = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 3)
        self.D, self.cap = rng.choice([1, 4, 8, 16, 24]), rng.randint(1, 24)
        self.dtype = rng.choice(FLOATS)
        self.store = a2ats_core.KVStore(
            self.L, self.B, self.Hkv, self.D, self.cap, self.dtype, threads=rng.randint(0, 3)
        )
        self.k = torch.zeros(self.L, self.B, self.Hkv, self.cap, self.D, dtype=self.dtype)
        self.v = torch.zeros_like(self.k)
        self.lengths = np.zeros((self.L, self.B), dtype=np.int64)

    def state(self):
        """Everything stored, read back through gather: lengths and rows."""
        out = {"lengths": torch.from_numpy(self.store.lengths().copy())}
        for layer in range(self.L):
            n = int(self.lengths[layer].max())
            idx = torch.arange(n, dtype=torch.int32).expand(self.B, self.Hkv, n).contiguous()
            cnt = torch.tensor(self.lengths[layer], dtype=torch.int32)[:, None].expand(self.B, self.Hkv).contiguous()
            ok, ov = (torch.zeros(self.B, self.Hkv, n, self.D, dtype=self.dtype) for _ in range(2))
            self.store.gather(layer, idx, cnt, ok, ov)
            out[f"k{layer}"], out[f"v{layer}"] = bits(ok), bits(ov)
        return out

    def verify(self):
        if not np.array_equal(self.store.lengths(), self.lengths):
            raise Mismatch("KVStore lengths differ from the model")
        state = self.state()
        for layer in range(self.L):
            for b in range(self.B):
                n = int(self.lengths[layer, b])
                for key, ref in (("k", self.k), ("v", self.v)):
                    got = state[f"{key}{layer}"][b, :, :n]
                    if not torch.equal(got, bits(ref[layer, b, :, :n])):
                        raise Mismatch(f"KVStore {key} rows of layer {layer} row {b} differ from the model")


def fuzz_store_constructor(rng):
    dims = dict(
        num_layers=rng.randint(1, 3),
        batch=rng.randint(1, 3),
        num_kv_heads=rng.randint(1, 3),
        head_dim=rng.randint(1, 16),
        capacity=rng.randint(1, 32),
    )
    options = dict(dtype=rng.choice(FLOATS + ["float32", "float16", "bfloat16"]), threads=rng.randint(0, 4))
    if rng.random() < 0.5:
        store = a2ats_core.KVStore(*dims.values(), options["dtype"], threads=options["threads"])
        if (
            not (store.lengths() == 0).all()
            or store.capacity != dims["capacity"]
            or store.nbytes < 2 * int(np.prod(list(dims.values())))
        ):
            raise Mismatch("KVStore constructed with the wrong size or lengths")
        return False
    choice = rng.randrange(5)
    if choice == 0:
        name = rng.choice(list(dims))
        dims[name] = rng.choice([0, -1, -(2**40)])
        cite = {name}
    elif choice == 1:  # products that overflow int64 or exceed memory
        for name in rng.sample(list(dims), 2):
            dims[name] = rng.choice([2**31 - 1, 2**41])
        cite = set(dims) | {"KVStore"}
    elif choice == 2:
        options["dtype"] = rng.choice([torch.int32, torch.float64, "int8", 5])
        cite = {"dtype"}
    elif choice == 3:
        options["threads"] = rng.choice([-1, 1025, 100000])
        cite = {"threads"}
    else:
        dims["capacity"] = 2**31
        cite = {"capacity"}
    expect_rejected(
        lambda: a2ats_core.KVStore(*dims.values(), options["dtype"], threads=options["threads"]),
        cite,
        {},
        dict,
        "KVStore",
    )
    return True


def fuzz_append(rng, model: StoreModel):
    layer, t = rng.randrange(model.L), rng.randint(0, 5)
    k = strided(rng, (model.B, model.Hkv, t, model.D), model.dtype)
    v = strided(rng, (model.B, model.Hkv, t, model.D), model.dtype)
    num_tokens = torch.randint(0, t + 1, (model.B,), dtype=torch.int32) if rng.random() < 0.5 else None
    counts = num_tokens.tolist() if num_tokens is not None else [t] * model.B
    room = all(model.lengths[layer, b] + counts[b] <= model.cap for b in range(model.B))
    kw = dict(layer=layer, k=k, v=v, num_tokens=num_tokens)
    cite = None
    if rng.random() < 0.5 or not room:
        choice = rng.randrange(7) if room else -1
        if choice == -1:
            cite = {"capacity"}
        elif choice == 0:
            kw["layer"], cite = rng.choice([-1, model.L, 2**40]), {"layer"}
        elif choice == 1:
            kw["k"], cite = k.to(torch.float64), {"k"}
        elif choice == 2:
            kw["v"], cite = torch.zeros(model.B, model.Hkv, t + 1, model.D, dtype=model.dtype), {"v"}
        elif choice == 3:
            kw["k"], cite = torch.zeros(model.B + 1, model.Hkv, t, model.D, dtype=model.dtype), {"k"}
        elif choice == 4:
            bad = torch.zeros(model.B, dtype=torch.int32)
            bad[rng.randrange(model.B)] = rng.choice([-1, t + 1])
            kw["num_tokens"], cite = bad, {"num_tokens"}
        elif choice == 5:
            kw["num_tokens"], cite = torch.zeros(model.B, dtype=torch.int64), {"num_tokens"}
        else:
            kw["k"], cite = [[1.0]], {"k"}
    if cite:
        before = model.state()
        expect_rejected(
            lambda: model.store.append(kw["layer"], kw["k"], kw["v"], num_tokens=kw["num_tokens"]),
            cite,
            before,
            model.state,
            "KVStore.append",
        )
        return True
    model.store.append(layer, k, v, num_tokens=num_tokens)
    for b, n in enumerate(counts):
        start = int(model.lengths[layer, b])
        model.k[layer, b, :, start : start + n] = k[b, :, :n]
        model.v[layer, b, :, start : start + n] = v[b, :, :n]
        model.lengths[layer, b] += n
    if rng.random() < 0.1:
        model.verify()
    return False


def draw_selection(rng, model, layer):
    kmax = rng.randint(0, 10)
    indices = torch.full((model.B, model.Hkv, kmax), -1, dtype=torch.int32)
    counts = torch.zeros(model.B, model.Hkv, dtype=torch.int32)
    for b in range(model.B):
        n = int(model.lengths[layer, b])
        for g in range(model.Hkv):
            c = rng.randint(0, min(kmax, n)) if n else 0
            counts[b, g] = c
            if c:
                indices[b, g, :c] = torch.randint(0, n, (c,), dtype=torch.int32)
    return indices, counts


def fuzz_gather(rng, model: StoreModel):
    layer = rng.randrange(model.L)
    indices, counts = draw_selection(rng, model, layer)
    kmax = indices.shape[2]
    shape = (model.B, model.Hkv, kmax, model.D)
    out_k = torch.full(shape, SENTINEL, dtype=model.dtype)
    out_v = torch.full(shape, SENTINEL, dtype=model.dtype)
    kw = dict(layer=layer, indices=indices, counts=counts, out_k=out_k, out_v=out_v)
    cite = None
    if rng.random() < 0.5:
        choice = rng.randrange(7)
        if choice == 0 and kmax:
            kw["out_v"], cite = out_k, {"out_v"}
        elif choice == 1 and kmax and int(counts.max()) > 0:
            bad = indices.clone()
            b, g = [int(i) for i in torch.nonzero(counts)[rng.randrange(int((counts > 0).sum()))]]
            bad[b, g, rng.randrange(int(counts[b, g]))] = rng.choice([-1, int(model.lengths[layer, b]), 2**31 - 1])
            kw["indices"], cite = bad, {"indices"}
        elif choice == 2:
            bad = counts.clone()
            bad[rng.randrange(model.B), rng.randrange(model.Hkv)] = rng.choice([-1, kmax + 1])
            kw["counts"], cite = bad, {"counts"}
        elif choice == 3:
            kw["out_k"], cite = out_k.to(torch.float64), {"out_k"}
        elif choice == 4:
            kw["out_v"], cite = torch.zeros(model.B, model.Hkv, kmax + 1, model.D, dtype=model.dtype), {"out_v"}
        elif choice == 5:
            kw["layer"], cite = rng.choice([-1, model.L]), {"layer"}
        else:
            kw["indices"], cite = indices.to(torch.int64), {"indices"}
    if cite:
        watched = lambda: {"out_k": bits(out_k), "out_v": bits(out_v), **model.state()}  # noqa: E731
        expect_rejected(
            lambda: model.store.gather(kw["layer"], kw["indices"], kw["counts"], kw["out_k"], kw["out_v"]),
            cite,
            watched(),
            watched,
            "KVStore.gather",
        )
        return True
    model.store.gather(layer, indices, counts, out_k, out_v)
    full_k, full_v = model.k[layer], model.v[layer]
    valid = torch.arange(kmax)[None, None] < counts[..., None]
    for out, full in ((out_k, full_k), (out_v, full_v)):
        want = reference.gather(full, indices, counts)
        got = torch.where(valid[..., None], out, want)  # slots past counts are untouched
        if not torch.equal(bits(got), bits(want)) or not bool((out[~valid] == SENTINEL).all()):
            raise Mismatch("KVStore.gather differs from the reference")
    return False


def fuzz_attend(rng, model: StoreModel):
    layer = rng.randrange(model.L)
    G = rng.choice([1, 2, 3])
    indices, counts = draw_selection(rng, model, layer)
    q = strided(rng, (model.B, model.Hkv * G, model.D), torch.float32)
    scale = rng.choice([1.0, 0.125, 1 / model.D**0.5])
    kw = dict(layer=layer, q=q, indices=indices, counts=counts, scale=scale)
    cite = None
    if rng.random() < 0.5:
        choice = rng.randrange(5)
        if choice == 0:
            kw["q"], cite = q.half(), {"q"}
        elif choice == 1:
            kw["scale"], cite = rng.choice([float("nan"), float("inf")]), {"scale"}
        elif choice == 2 and model.Hkv > 1:
            kw["q"], cite = torch.randn(model.B, model.Hkv * G + 1, model.D), {"q"}
        elif choice == 3:
            bad = counts.clone()
            bad[rng.randrange(model.B), rng.randrange(model.Hkv)] = indices.shape[2] + 1
            kw["counts"], cite = bad, {"counts"}
        else:
            kw["layer"], cite = model.L, {"layer"}
    if cite:
        before = model.state()
        expect_rejected(
            lambda: model.store.attend(kw["layer"], kw["q"], kw["indices"], kw["counts"], scale=kw["scale"]),
            cite,
            before,
            model.state,
            "KVStore.attend",
        )
        return True
    out, lse = model.store.attend(layer, q, indices, counts, scale=scale)
    kmax = indices.shape[2]
    keys = reference.gather(model.k[layer], indices, counts)
    values = reference.gather(model.v[layer], indices, counts)
    valid = torch.arange(kmax)[None, None] < counts[..., None]
    want_out, want_lse = reference.attend(q, keys, values, valid, scale=scale)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)
    return False


# ----------------------------------------------------------------------------- Pipeline


class PipelineModel:
    """A Pipeline and the reference composition of the ops (tests/test_pipeline.py) beside it."""

    def __init__(self, rng):
        from kernel_helpers import ReferencePipeline, random_codebook

        self.L, self.B, self.Hkv, self.G = (
            rng.randint(1, 2),
            rng.randint(1, 3),
            rng.randint(1, 2),
            rng.choice([1, 2, 3]),
        )
        self.D = rng.choice([4, 8, 16])
        M, C = rng.choice([1, 2]), rng.choice([1, 4, 16])
        self.cap, self.sink, self.window = rng.randint(4, 40), rng.randint(0, 4), rng.randint(1, 6)
        bins = rng.choice([1, 1, 2, 3])
        distances = [rng.randint(0, 64) for _ in range(bins)]
        edges = sorted(rng.randint(0, self.cap) for _ in range(bins - 1))
        self.dtype = rng.choice(FLOATS)
        book = random_codebook(self.L, self.Hkv, self.D, M, C, torch.Generator().manual_seed(rng.randrange(2**31)))
        self.store = a2ats_core.KVStore(self.L, self.B, self.Hkv, self.D, self.cap, self.dtype)
        self.pipe = a2ats_core.Pipeline(
            self.store,
            num_q_heads=self.Hkv * self.G,
            inv_freq=book[3],
            chol=book[0],
            chol_inv=book[1],
            centroids=book[2],
            sink=self.sink,
            window=self.window,
            wrope_distances=distances,
            bin_edges=edges,
        )
        self.ref = ReferencePipeline(
            self.L,
            self.B,
            self.Hkv * self.G,
            self.Hkv,
            self.D,
            self.cap,
            self.dtype,
            book,
            self.sink,
            self.window,
            distances,
            edges,
        )
        self.next_layer = None  # the layer a planned step decodes next
        self.k = 0

    def state(self):
        return {
            "lengths": torch.from_numpy(self.store.lengths().copy()),
            **{f"codes{layer}": torch.from_numpy(self.pipe.codes(layer)) for layer in range(self.L)},
        }

    def rows(self, rng, t, dtype=None):
        return strided(rng, (self.B, self.Hkv, t, self.D), dtype or self.dtype)


def fuzz_pipeline(rng, model: PipelineModel):
    """One Pipeline call: the next layer of a planned step, or else a prefill or a plan."""
    B, Hq, D = model.B, model.Hkv * model.G, model.D
    invalid = rng.random() < 0.5
    if model.next_layer is not None:
        layer = model.next_layer
        q = strided(rng, (B, Hq, D), model.dtype)
        k, v = model.rows(rng, 1), model.rows(rng, 1)
        positions = torch.from_numpy(model.store.lengths()[layer].copy()) + rng.randint(0, 5)
        kw = dict(layer=layer, q=q, k=k, v=v, positions=positions, scale=rng.choice([0.25, 1.0]))
        mutations = [
            ("q", dict(q=q.double())),
            ("q", dict(q=torch.zeros(B, Hq + 1, D, dtype=model.dtype))),
            ("k", dict(k=model.rows(rng, 2))),
            ("v", dict(v=v.to(torch.float64))),
            ("positions", dict(positions=positions.int())),
            ("positions", dict(positions=positions[None])),
            ("scale", dict(scale=float("nan"))),
            ("layer", dict(layer=model.L)),
            ("layer", dict(layer=layer - 1) if layer > 0 else dict(layer=-1)),
        ]
        if q.is_contiguous():
            mutations.append(("out", dict(out=q)))
        if invalid:
            cite, change = rng.choice(mutations)
            kw.update(change)
            before = model.state()
            expect_rejected(
                lambda: model.pipe.decode(
                    kw.pop("layer"), kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("positions"), **kw
                ),
                {cite},
                before,
                model.state,
                "Pipeline.decode",
            )
            return True
        out = model.pipe.decode(layer, q, k, v, positions, scale=kw["scale"])
        selection = tuple(torch.from_numpy(a) for a in model.pipe.last_selection())
        want, _ = model.ref.decode(
            layer,
            q,
            k,
            v,
            positions,
            model.k,
            kw["scale"],
            codes=torch.from_numpy(model.pipe.codes(layer)),
            selection=selection,
        )
        tol = tolerance(model.dtype)
        torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)
        model.next_layer = layer + 1 if layer + 1 < model.L else None
        return False
    lengths = model.store.lengths()
    behind = [layer for layer in range(model.L) if (lengths[layer] != lengths[0]).any()]
    if not behind and rng.random() < 0.5 and int(lengths[0].max()) < model.cap:  # plan a step
        k = rng.randint(0, 8)
        if invalid:
            expect_rejected(
                lambda: model.pipe.plan(rng.choice([-1, 2**31])), {"k"}, model.state(), model.state, "Pipeline.plan"
            )
            return True
        model.pipe.plan(k)
        model.k, model.next_layer = k, 0
        return False
    # A prefill of layer 0, or of a layer catching up with layer 0's rows (plan() needs the layers
    # to agree).
    if behind:
        layer = behind[0]
        counts = [int(n) for n in lengths[0] - lengths[layer]]
        t = max(counts) + rng.randint(0, 2)
    else:
        layer, t = 0, rng.randint(0, 6)
        counts = [rng.randint(0, min(t, int(r))) for r in model.cap - lengths[0]]
    k, v = model.rows(rng, t), model.rows(rng, t)
    positions = torch.randint(0, 200, (B, t))
    kw = dict(k=k, v=v, positions=positions, num_tokens=torch.tensor(counts, dtype=torch.int32))
    if invalid:
        mutations = [
            ("k", dict(k=k.to(torch.float64))),
            ("v", dict(v=model.rows(rng, t + 1))),
            ("positions", dict(positions=positions.int())),
            ("positions", dict(positions=positions[:, :0] if t else positions[:, None])),
            ("num_tokens", dict(num_tokens=torch.full((B,), t + 1, dtype=torch.int32))),
            ("num_tokens", dict(num_tokens=torch.zeros(B, dtype=torch.int64))),
            ("layer", dict(layer=model.L)),
        ]
        if t:
            mutations.append(
                (
                    "capacity",
                    dict(
                        k=model.rows(rng, model.cap + 1),
                        v=model.rows(rng, model.cap + 1),
                        positions=torch.zeros(B, model.cap + 1, dtype=torch.int64),
                        num_tokens=None,
                    ),
                )
            )
        cite, change = rng.choice(mutations)
        kw.update(change)
        expect_rejected(
            lambda: model.pipe.prefill(kw.pop("layer", layer), kw.pop("k"), kw.pop("v"), kw.pop("positions"), **kw),
            {cite},
            model.state(),
            model.state,
            "Pipeline.prefill",
        )
        return True
    model.pipe.prefill(layer, k, v, positions, num_tokens=kw["num_tokens"])
    model.ref.append(layer, k, v, positions, counts)
    if not np.array_equal(model.store.lengths(), model.ref.lengths.numpy()):
        raise Mismatch("Pipeline.prefill stored a different number of rows than asked")
    return False


# ----------------------------------------------------------------------------- PagedPipeline


class PagedModel:
    """A PagedPipeline over random paged codes and a slot-indexed store, with the reference
    composition on the same rows in token order beside it (tests/kernel_helpers.PagedEngine)."""

    def __init__(self, rng):
        from kernel_helpers import PagedEngine

        bins = rng.choice([1, 1, 2, 3])
        prompts = [rng.randint(1, 30) for _ in range(rng.randint(1, 4))]
        self.engine = PagedEngine(
            prompts,
            G=rng.choice([1, 2, 3]),
            dtype=rng.choice(FLOATS),
            budget_per=rng.choice(["query_head", "kv_head"]),
            distances=[rng.randint(0, 64) for _ in range(bins)],
            edges=sorted(rng.randint(0, 40) for _ in range(bins - 1)),
            L=rng.randint(1, 2),
            Hkv=rng.randint(1, 2),
            D=rng.choice([4, 8, 16]),
            M=rng.choice([1, 2]),
            C=rng.choice([1, 4, 16]),
            sink=rng.randint(0, 4),
            window=rng.randint(1, 6),
            block_size=rng.choice([1, 4, 8]),
            room=48,
            seed=rng.randrange(2**31),
        )
        self.engine.prefill()

    def state(self):
        return {"codes": self.engine.codes.clone(), "lengths": torch.from_numpy(self.engine.store.lengths().copy())}


def fuzz_paged(rng, model: PagedModel):
    """One PagedPipeline call: a decode step of a random layer (its new rows written and encoded
    first), or a refused decode or encode."""
    e = model.engine
    layer = rng.randrange(e.L)
    n = len(e.prompts)
    q, keys, values = e.step_inputs()
    k = rng.randint(0, 8)
    if rng.random() < 0.5:
        lengths = e.ref.lengths[layer].clone()  # rows already held: only the mutation is wrong
        kw = dict(
            layer=layer,
            q=q,
            codes=e.codes[layer],
            lengths=lengths,
            block_table=e.block_table,
            k=torch.full((n,), k, dtype=torch.int32),
            scale=rng.choice([0.25, 1.0]),
        )
        past = lengths.clone()
        past[rng.randrange(n)] = e.block_table.shape[1] * e.block_size + 1
        negative = kw["k"].clone()
        negative[rng.randrange(n)] = -1
        far_block = e.block_table.clone()
        far_block[rng.randrange(n), 0] = e.codes.shape[1] + rng.randint(0, 9)
        mutations = [
            ("q", dict(q=q.double())),
            ("q", dict(q=torch.zeros(n, e.Hkv * e.G + 1, e.D, dtype=e.dtype))),
            ("lengths", dict(lengths=lengths.long())),
            ("lengths", dict(lengths=past)),
            ("k", dict(k=negative)),
            ("k", dict(k=kw["k"][:-1] if n > 1 else kw["k"][None])),
            ("block_table", dict(block_table=e.block_table.long())),
            ("block_table", dict(block_table=e.block_table[:-1] if n > 1 else e.block_table[0])),
            ("block_table", dict(block_table=far_block)),
            ("codes", dict(codes=e.codes[layer].to(torch.int32))),
            ("codes", dict(codes=e.codes[layer][:, :, :, :0])),
            ("scale", dict(scale=float("nan"))),
            ("layer", dict(layer=e.L)),
        ]
        if rng.random() < 0.3:  # an encode instead
            k_rows = keys[:, :, 0].contiguous()  # (n, Hkv, D)
            slots = e.slots(0, torch.arange(n) % e.prompts[0])
            positions = torch.arange(n, dtype=torch.int64)
            encode_mutations = [
                ("k", dict(k=k_rows.double())),
                ("positions", dict(positions=positions.int())),
                ("slots", dict(slots=slots[:-1] if n > 1 else slots[None])),
                ("slots", dict(slots=slots + e.codes.shape[1] * e.block_size)),
                ("codes", dict(codes=e.codes[layer].to(torch.int32))),
                ("layer", dict(layer=-1)),
            ]
            cite, change = rng.choice(encode_mutations)
            args = dict(layer=layer, k=k_rows, positions=positions, slots=slots, codes=e.codes[layer])
            args.update(change)
            expect_rejected(lambda: e.pipe.encode(**args), {cite}, model.state(), model.state, "PagedPipeline.encode")
            return True
        cite, change = rng.choice(mutations)
        kw.update(change)
        expect_rejected(
            lambda: e.pipe.decode(
                kw.pop("layer"),
                kw.pop("q"),
                kw.pop("codes"),
                kw.pop("lengths"),
                kw.pop("block_table"),
                kw.pop("k"),
                **kw,
            ),
            {cite},
            model.state(),
            model.state,
            "PagedPipeline.decode",
        )
        return True
    positions = e.ref.lengths[layer].long()  # each request's new token
    for request in range(n):
        e.write(layer, request, keys[request], values[request], positions[request : request + 1])
    lengths = (positions + 1).to(torch.int32)
    scale = rng.choice([0.25, 1.0])
    out = e.pipe.decode(
        layer, q, e.codes[layer], lengths, e.block_table, torch.full((n,), k, dtype=torch.int32), scale=scale
    )
    selection = tuple(torch.from_numpy(a) for a in e.pipe.last_selection())
    want, _ = e.ref.decode(layer, q, keys, values, positions, k, scale, codes=e.token_codes(layer), selection=selection)
    tol = tolerance(e.dtype)
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)
    return False


STORE_OPS = {"KVStore.append": fuzz_append, "KVStore.gather": fuzz_gather, "KVStore.attend": fuzz_attend}
ALL = [*BINDINGS, "KVStore", *STORE_OPS, "Pipeline", "PagedPipeline"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per binding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-failures", type=int, default=5)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    summary = {name: {"valid": 0, "invalid": 0} for name in ALL}
    failures = []
    model, pipeline, paged = StoreModel(rng), None, None
    for i in range(args.calls * len(ALL)):
        name = ALL[i % len(ALL)]
        try:
            if name in BINDINGS:
                invalid = fuzz_function(rng, name)
            elif name == "KVStore":
                invalid = fuzz_store_constructor(rng)
            elif name == "Pipeline":
                if pipeline is None or i % (40 * len(ALL)) == len(ALL) - 1:
                    pipeline = PipelineModel(rng)
                invalid = fuzz_pipeline(rng, pipeline)
            elif name == "PagedPipeline":
                if paged is None or i % (30 * len(ALL)) == len(ALL) - 1:
                    paged = PagedModel(rng)  # 30 calls: at most 30 tokens grown, within room
                invalid = fuzz_paged(rng, paged)
            else:
                if i % (50 * len(ALL)) < len(ALL) and name == "KVStore.append":
                    model = StoreModel(rng)
                invalid = STORE_OPS[name](rng, model)
            summary[name]["invalid" if invalid else "valid"] += 1
        except (Mismatch, AssertionError) as error:
            failures.append(f"call {i} ({name}, seed {args.seed}): {error}")
            if len(failures) >= args.max_failures:
                break
    try:
        model.verify()
    except Mismatch as error:
        failures.append(f"final store check: {error}")
    print(json.dumps({"calls": summary, "failures": len(failures)}))
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
