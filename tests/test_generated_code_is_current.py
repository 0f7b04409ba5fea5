"""The committed tagstore/v1/*_pb2*.py(i) are exactly what scripts/gen_proto.py generates from
proto/: a proto change without regeneration (or a hand edit of generated code) fails here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) is not installed")


def _load_gen_proto() -> object:
    spec = importlib.util.spec_from_file_location("gen_proto", REPO_ROOT / "scripts/gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    gen_proto = _load_gen_proto()
    generated = gen_proto.generate(tmp_path)  # type: ignore[attr-defined]
    assert generated, "no proto files found"
    stale = [
        str(path)
        for path in generated
        if (tmp_path / path).read_bytes() != (REPO_ROOT / path).read_bytes()
    ]
    assert [] == stale, "regenerate with: python scripts/gen_proto.py"


def test_every_generated_file_is_committed_in_the_package() -> None:
    package = REPO_ROOT / "tagstore" / "v1"
    names = sorted(p.name for p in package.iterdir() if p.name.startswith("tagstore_pb2"))
    assert ["tagstore_pb2.py", "tagstore_pb2.pyi", "tagstore_pb2_grpc.py"] == names
