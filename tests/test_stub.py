"""The type stub a2ats_core.pyi: shipped beside the extension and in step with it.

The installed module must have its stub next to it (CMakeLists.txt installs bindings/a2ats_core.pyi
beside the .so), identical to the source one in a checkout. The stub must name exactly the module's
public attributes, and every function, method and constructor must take the parameters the binding
takes: names, order, keyword-only split and which have defaults, as pybind11 writes them in the first
line of each __doc__ (inspect.signature cannot read pybind11 functions). Read-only properties are
@property in the stub; where pybind11 knows a concrete type (bool, str, int, a list or an array), the
stub's annotation must agree.
"""

from __future__ import annotations

import ast
import copy
import pathlib
import re

import pytest

import a2ats_core

SOURCE_STUB = pathlib.Path(__file__).resolve().parents[1] / "bindings" / "a2ats_core.pyi"
INSTALLED_STUB = pathlib.Path(a2ats_core.__file__).with_name("a2ats_core.pyi")


def _installed_text() -> str:
    assert INSTALLED_STUB.is_file(), (
        f"a2ats_core is installed at {a2ats_core.__file__} without its stub {INSTALLED_STUB.name} "
        "beside it (CMakeLists.txt: install(FILES bindings/a2ats_core.pyi DESTINATION .))"
    )
    return INSTALLED_STUB.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def stub() -> ast.Module:
    return ast.parse(_installed_text(), filename=str(INSTALLED_STUB))


@pytest.fixture(scope="module")
def aliases(stub: ast.Module) -> dict[str, str]:
    """The stub's module-level `_Name: TypeAlias = ...` definitions, as source text."""
    out = {}
    for node in stub.body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.value is not None
            and ast.unparse(node.annotation) in ("TypeAlias", "typing.TypeAlias")
        ):
            out[node.target.id] = ast.unparse(node.value)
    return out


def _is_public(name: str) -> bool:
    return not name.startswith("_") or name == "__version__"


def _defs(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """Name -> definition of the functions, classes and annotated names of a stub body."""
    out: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        # One definition per name: an @overload set would need a signature per overload here.
        assert name not in out, f"the stub defines {name} more than once"
        out[name] = node
    return out


def _parse_def(header: str) -> ast.FunctionDef:
    node = ast.parse(f"def {header}: ...").body[0]
    assert isinstance(node, ast.FunctionDef)
    return node


def _runtime_def(obj: object, name: str) -> ast.FunctionDef:
    """The signature pybind11 writes as the first line of obj.__doc__, parsed as a def."""
    doc = getattr(obj, "__doc__", None) or ""
    first = doc.splitlines()[0] if doc else ""
    assert first.startswith(name + "("), f"{name}: no pybind11 signature in the first line of __doc__: {first!r}"
    return _parse_def(first)


def _params(fn: ast.FunctionDef, *, method: bool) -> dict[str, object]:
    """Parameter names, in order, split at the keyword-only marker, with whether each has a default."""
    a = fn.args
    positional = a.posonlyargs + a.args
    if method:
        assert positional and positional[0].arg in ("self", "arg0"), f"{fn.name}: no self parameter"
        positional = positional[1:]
    first_default = len(a.posonlyargs + a.args) - len(a.defaults) - (1 if method else 0)
    return {
        "positional": [(p.arg, i >= first_default) for i, p in enumerate(positional)],
        "keyword_only": [(p.arg, d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)],
        "*args": a.vararg.arg if a.vararg else None,
        "**kwargs": a.kwarg.arg if a.kwarg else None,
    }


class _Resolve(ast.NodeTransformer):
    def __init__(self, aliases: dict[str, str]):
        self.aliases = aliases

    def visit_Name(self, node: ast.Name) -> ast.expr:
        if node.id in self.aliases:
            return self.visit(ast.parse(self.aliases[node.id], mode="eval").body)
        return node


def _text(annotation: ast.expr | None, aliases: dict[str, str]) -> str:
    """An annotation as source, the stub's aliases and import abbreviations resolved."""
    if annotation is None:
        return ""
    text = ast.unparse(_Resolve(aliases).visit(copy.deepcopy(annotation)))
    text = re.sub(r"\bnpt\.", "numpy.typing.", re.sub(r"\bnp\.", "numpy.", text))
    return re.sub(r"\b(typing|collections\.abc)\.", "", text)


# pybind11's spelling of a parameter or return type -> what the stub may write for it. "object"
# (a py::handle: arrays, dtype, device, stream) is not checked.
_ACCEPTED = {
    "SupportsInt | SupportsIndex": {"int", "SupportsIndex", "SupportsInt | SupportsIndex"},
    "SupportsFloat | SupportsIndex": {"float", "SupportsFloat | SupportsIndex"},
    "Sequence[SupportsInt | SupportsIndex]": {
        "Sequence[int]",
        "Sequence[SupportsIndex]",
        "Sequence[SupportsInt | SupportsIndex]",
    },
}


def _check_types(
    where: str, runtime: ast.FunctionDef, stub: ast.FunctionDef, aliases: dict[str, str], method: bool
) -> None:
    rt_args = runtime.args.posonlyargs + runtime.args.args + runtime.args.kwonlyargs
    st_args = stub.args.posonlyargs + stub.args.args + stub.args.kwonlyargs
    if method:
        rt_args, st_args = rt_args[1:], st_args[1:]
    pairs = [(p.arg, r.annotation, s.annotation) for p, r, s in zip(rt_args, rt_args, st_args)]
    pairs.append(("return", runtime.returns, stub.returns))
    for name, rt_ann, st_ann in pairs:
        rt = _text(rt_ann, {})
        st = _text(st_ann, aliases)
        assert st, f"{where}: {name} has no annotation in the stub"
        if rt == "object":
            continue
        if rt in _ACCEPTED:
            assert st in _ACCEPTED[rt], f"{where}: {name} is {rt} at runtime but {st} in the stub"
        elif "[" in rt or "[" not in st:
            assert st == rt, f"{where}: {name} is {rt} at runtime but {st} in the stub"
        else:  # pybind11 says only tuple / dict / list: the stub may say what is inside
            assert st.split("[")[0] == rt, f"{where}: {name} is {rt} at runtime but {st} in the stub"


def _compare(
    where: str, runtime_obj: object, name: str, stub_node: ast.stmt, aliases: dict[str, str], method: bool
) -> None:
    assert isinstance(stub_node, ast.FunctionDef), f"{where} is a function at runtime but not in the stub"
    runtime = _runtime_def(runtime_obj, name)
    assert _params(stub_node, method=method) == _params(runtime, method=method), (
        f"{where}: stub signature ({ast.unparse(stub_node.args)}) differs from the binding's "
        f"({ast.unparse(runtime.args)})"
    )
    _check_types(where, runtime, stub_node, aliases, method)
    assert ast.get_docstring(stub_node), f"{where} has no docstring in the stub"


def _is_property(node: ast.stmt) -> bool:
    return isinstance(node, ast.FunctionDef) and any(
        isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list
    )


def test_stub_is_installed_beside_the_module():
    _installed_text()


@pytest.mark.skipif(not SOURCE_STUB.is_file(), reason="not a source checkout (no bindings/a2ats_core.pyi)")
def test_installed_stub_is_the_source_one():
    assert _installed_text() == SOURCE_STUB.read_text(encoding="utf-8"), (
        f"{INSTALLED_STUB} differs from {SOURCE_STUB}: reinstall the package"
    )


def test_stub_names_are_the_module_names(stub):
    runtime = {n for n in dir(a2ats_core) if _is_public(n)}
    stubbed = {n for n in _defs(stub.body) if _is_public(n)}
    assert stubbed == runtime, (
        f"only in the module: {sorted(runtime - stubbed)}; only in the stub: {sorted(stubbed - runtime)}"
    )


def test_version_and_module_attributes(stub):
    node = _defs(stub.body)["__version__"]
    assert isinstance(node, ast.AnnAssign) and ast.unparse(node.annotation) == "str"
    assert isinstance(a2ats_core.__version__, str)


def _module_functions() -> list[str]:
    return sorted(
        n
        for n in dir(a2ats_core)
        if _is_public(n) and callable(getattr(a2ats_core, n)) and not isinstance(getattr(a2ats_core, n), type)
    )


def _classes() -> list[str]:
    return sorted(n for n in dir(a2ats_core) if _is_public(n) and isinstance(getattr(a2ats_core, n), type))


def test_there_is_something_to_check():
    assert "rotary" in _module_functions() and {"KVStore", "Pipeline"} <= set(_classes())


@pytest.mark.parametrize("name", _module_functions())
def test_function_signature(stub, aliases, name):
    _compare(name, getattr(a2ats_core, name), name, _defs(stub.body)[name], aliases, method=False)


@pytest.mark.parametrize("cls_name", _classes())
def test_class_members(stub, aliases, cls_name):
    cls = getattr(a2ats_core, cls_name)
    node = _defs(stub.body)[cls_name]
    assert isinstance(node, ast.ClassDef), f"{cls_name} is a class at runtime but not in the stub"
    assert ast.get_docstring(node), f"{cls_name} has no docstring in the stub"
    members = _defs(node.body)

    rt_props = {n for n, v in vars(cls).items() if isinstance(v, property)}
    rt_methods = {
        n
        for n, v in vars(cls).items()
        if (_is_public(n) or n == "__init__") and callable(v) and not isinstance(v, property)
    }
    st_props = {n for n, v in members.items() if _is_property(v)}
    st_methods = {n for n, v in members.items() if isinstance(v, ast.FunctionDef) and not _is_property(v)}
    assert st_props == rt_props, (
        f"{cls_name} properties only at runtime: {sorted(rt_props - st_props)}; "
        f"only in the stub: {sorted(st_props - rt_props)}"
    )
    assert st_methods == rt_methods, (
        f"{cls_name} methods only at runtime: {sorted(rt_methods - st_methods)}; "
        f"only in the stub: {sorted(st_methods - rt_methods)}"
    )
    assert not {n for n in members if not isinstance(members[n], ast.FunctionDef)}, (
        f"{cls_name}: the stub has class attributes the runtime class lacks"
    )

    for name in sorted(rt_methods):
        _compare(f"{cls_name}.{name}", getattr(cls, name), name, members[name], aliases, method=True)
    for name in sorted(rt_props):
        prop = vars(cls)[name]
        assert prop.fset is None, f"{cls_name}.{name} is writable at runtime; the stub has it read-only"
        stub_fn = members[name]
        assert isinstance(stub_fn, ast.FunctionDef)
        assert [a.arg for a in stub_fn.args.args] == ["self"], f"{cls_name}.{name}: a property takes only self"
        # pybind11 writes a property getter's signature without its name: "(arg0: KVStore) -> int".
        getter = _parse_def(name + (prop.fget.__doc__ or "").splitlines()[0])
        _check_types(f"{cls_name}.{name}", getter, stub_fn, aliases, method=True)
