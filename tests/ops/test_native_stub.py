"""python/dmdr_fast/_C.pyi (the typed stub mypy checks the launchers with) describes the compiled
module: the same functions, argument names and kinds, and return types as pybind11 reports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import dmdr_fast
from dmdr_fast._native import get_native

STUB = Path(dmdr_fast.__file__).with_name("_C.pyi")


def _stub_signatures() -> dict[str, tuple[list[tuple[str, str]], str]]:
    tree = ast.parse(STUB.read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            params = [(a.arg, ast.unparse(a.annotation)) for a in node.args.args if a.annotation is not None]
            assert len(params) == len(node.args.args), f"{node.name}: unannotated argument"
            assert node.returns is not None, f"{node.name}: no return annotation"
            out[node.name] = (params, ast.unparse(node.returns))
    return out


def _kind(pybind_type: str) -> str:
    """pybind11's argument type → the plain Python type the stub states."""
    if "SupportsFloat" in pybind_type:
        return "float"
    if "SupportsInt" in pybind_type:
        return "int"
    return pybind_type


def _native_signatures(native: object) -> dict[str, tuple[list[tuple[str, str]], str]]:
    out = {}
    for name in dir(native):
        fn = getattr(native, name)
        if name.startswith("_") or not callable(fn):
            continue
        m = re.match(rf"{name}\((.*)\) -> (.+)$", fn.__doc__.splitlines()[0])
        assert m, fn.__doc__
        args = [a.split(": ", 1) for a in re.split(r", (?=\w+: )", m.group(1))] if m.group(1) else []
        out[name] = ([(n, _kind(t)) for n, t in args], m.group(2))
    return out


def test_stub_matches_compiled_module():
    native = get_native()
    if native is None:
        pytest.skip("dmdr_fast._C not built")
    stub, compiled = _stub_signatures(), _native_signatures(native)
    assert sorted(stub) == sorted(compiled)
    for name, (params, ret) in compiled.items():
        assert stub[name][0] == params, name
        # pybind11 writes a bare `dict`; the stub says what the dict holds
        assert stub[name][1] == ret or stub[name][1].startswith(f"{ret}["), name
