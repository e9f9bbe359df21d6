"""Shared fixtures for the a2ats_core tests.

Every kernel test takes the ``device`` fixture: "cpu" always, "cuda" when the extension was
built with CUDA, sees a device, and torch can use it (otherwise that parameter is skipped with
the reason). CPU and CUDA implementations must pass the very same tests. Tests marked
``every_isa`` run their CPU parameters once per ISA level the CPU supports.
"""

from __future__ import annotations

import os

import pytest
import torch

import a2ats_core


def _cuda_skip_reason() -> str | None:
    if not a2ats_core.built_with_cuda():
        return "a2ats_core was built without CUDA (built_with_cuda() is False)"
    if a2ats_core.cuda_device_count() == 0:
        return "a2ats_core sees no CUDA device (cuda_device_count() == 0)"
    if not torch.cuda.is_available():
        return "torch cannot use CUDA (torch.cuda.is_available() is False)"
    return None


# .ci/sanitize runs these tests against its own ASan build: make sure that is the one imported.
_EXPECTED_CORE = os.environ.get("A2ATS_EXPECT_CORE")
if _EXPECTED_CORE and not os.path.realpath(a2ats_core.__file__).startswith(os.path.realpath(_EXPECTED_CORE)):
    raise pytest.UsageError(
        f"A2ATS_EXPECT_CORE={_EXPECTED_CORE} but a2ats_core was imported from {a2ats_core.__file__}"
    )

CUDA_SKIP_REASON = _cuda_skip_reason()
HAS_CUDA = CUDA_SKIP_REASON is None

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=str(CUDA_SKIP_REASON))),
]

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=str(CUDA_SKIP_REASON))


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device the native kernel runs on ("cpu" or "cuda")."""
    return request.param


# -- ISA levels: the CPU kernels' hot loops exist as baseline, AVX2 and AVX-512 clones ----------

ISA_LEVELS = a2ats_core.supported_isas()  # lowest first; the last is what runs by default
BEST_ISA = ISA_LEVELS[-1]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "every_isa: run the test once per ISA level this CPU supports (a2ats_core.set_isa), CPU parameters only",
    )


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("every_isa"):
        metafunc.parametrize("isa", ISA_LEVELS, indirect=True, ids=[f"isa-{level}" for level in ISA_LEVELS])


def pytest_collection_modifyitems(config, items):
    # The ISA level is the CPU's: a CUDA parameter runs once, at the default level.
    def redundant(item):
        params = getattr(item, "callspec", None)
        params = params.params if params else {}
        return params.get("device") == "cuda" and params.get("isa", BEST_ISA) != BEST_ISA

    dropped = [item for item in items if redundant(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not redundant(item)]


@pytest.fixture(autouse=True)
def isa(request):
    """The ISA level the CPU kernels run at: the parameter of an ``every_isa`` test, else the default."""
    level = getattr(request, "param", None)
    if level is None:
        yield a2ats_core.isa()
        return
    previous = a2ats_core.isa()
    a2ats_core.set_isa(level)
    try:
        yield level
    finally:
        a2ats_core.set_isa(previous)


@pytest.fixture(autouse=True)
def _seed():
    """Deterministic random inputs for every test."""
    torch.manual_seed(1234)
    yield


# -- shared state: no test may leave it changed ----------------------------------------------------


def shared_state(model=None, codebook=None) -> dict:
    """What a test must leave as it found it: torch's global settings, and of the shared model
    and codebook every tensor (object, in-place version counter, dtype, device), the modules'
    training flags and the config. Tensors are compared by ``_version``, which every in-place
    write bumps, so the check costs nothing however large the model."""
    state = {
        "torch": (
            torch.get_num_threads(),
            torch.get_default_dtype(),
            torch.is_grad_enabled(),
            torch.are_deterministic_algorithms_enabled(),
        )
    }

    def tensors(named):
        return [(name, id(t), t._version, t.dtype, str(t.device), t.requires_grad, tuple(t.shape)) for name, t in named]

    if model is not None:
        state["model_tensors"] = tensors(list(model.named_parameters()) + list(model.named_buffers()))
        state["model_training"] = [module.training for module in model.modules()]
        state["model_config"] = {key: repr(value) for key, value in vars(model.config).items()}
    if codebook is not None:
        named = [
            (f"{kind}{layer}", t)
            for kind, table in (
                ("centroids", codebook.centroids),
                ("chol", codebook.chol),
                ("chol_inv", codebook.chol_inv),
            )
            for layer, t in table.items()
        ] + [("inv_freq", codebook.inv_freq)]
        state["codebook_tensors"] = tensors(named)
        state["codebook_metadata"] = repr(codebook.metadata)
    return state


def leaked_state(before: dict, after: dict) -> list[str]:
    """One line per part of :func:`shared_state` that differs, with its first difference."""
    leaks = []
    for key, old in before.items():
        new = after[key]
        if old == new:
            continue
        if isinstance(old, dict):
            diffs = [
                f"{name}: {old.get(name)} -> {new.get(name)}"
                for name in sorted(set(old) | set(new))
                if old.get(name) != new.get(name)
            ]
        elif isinstance(old, list):
            diffs = [f"{a} -> {b}" for a, b in zip(old, new) if a != b] or [f"{len(old)} -> {len(new)} entries"]
        else:
            diffs = [f"{old} -> {new}"]
        leaks.append(f"{key}: {diffs[0]}")
    return leaks


@pytest.fixture(autouse=True)
def _shared_state_unchanged(request):
    """Fails a test that leaves torch's settings, the session's SmolLM2 or its codebook changed.

    The one change allowed is the attention implementation that ``A2ATSCache`` switches a model
    to (by design it stays, and dense caches fall back to the previous one): it is put back here
    after every test, so that each test starts from the model as loaded."""
    model = codebook = None
    if "smollm2" in request.fixturenames:
        model = request.getfixturevalue("smollm2")[0]
    if "small_codebook" in request.fixturenames:
        codebook = request.getfixturevalue("small_codebook")
    if model is not None:
        attention = model.config._attn_implementation
        fallback = vars(model.config).get("_a2ats_fallback", None)
    before = shared_state(model, codebook)
    yield
    if model is not None:
        if model.config._attn_implementation != attention:
            model.set_attn_implementation(attention)
        if fallback is None:
            vars(model.config).pop("_a2ats_fallback", None)
        else:
            model.config._a2ats_fallback = fallback
    leaks = leaked_state(before, shared_state(model, codebook))
    if leaks:
        pytest.fail(
            "the test left shared state changed: " + "; ".join(leaks) + " (restore it, or work on a copy)",
            pytrace=False,
        )


def pytest_report_header(config):
    return (
        f"a2ats_core {a2ats_core.__version__}: built_with_cuda={a2ats_core.built_with_cuda()}, "
        f"cuda_device_count={a2ats_core.cuda_device_count()}, cpu threads={a2ats_core.num_threads()}; "
        f"cuda tests: {'run' if HAS_CUDA else 'skipped (' + str(CUDA_SKIP_REASON) + ')'}"
    )


# The real SmolLM2-135M and one small-preset codebook for it, shared by every test file that
# needs them: loading takes ~20 s and calibrating ~1 min on two cores.
@pytest.fixture(scope="session")
def smollm2():
    from a2ats.models import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def small_codebook(smollm2):
    from a2ats.calibration import calibrate

    model, tokenizer = smollm2
    return calibrate(model, tokenizer, preset="small", progress=False)


def pytest_addoption(parser):
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run the long forms of the fuzz test (10,000 calls per binding)",
    )
