"""Regenerate the committed protobuf/gRPC code from ``proto/``.

Usage: ``python scripts/gen_proto.py [OUT_DIR]`` (default: the repository root). The test
``tests/test_generated_code_is_current.py`` runs :func:`generate` into a temporary directory and
diffs the result against the committed files, so a proto change without regeneration fails CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def proto_files() -> list[Path]:
    """Every ``.proto`` file under ``proto/``, relative to it, sorted."""
    return sorted(p.relative_to(PROTO_DIR) for p in PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run ``grpc_tools.protoc`` on every proto file; return the generated files (relative)."""
    from grpc_tools import protoc  # imported here: only needed by developers and CI

    out_dir.mkdir(parents=True, exist_ok=True)
    # protoc resolves well-known imports (google/protobuf/*.proto) from grpc_tools' bundle.
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(p) for p in proto_files()),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    generated = []
    for proto in proto_files():
        stem = proto.with_suffix("")
        for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"):
            generated.append(stem.with_name(stem.name + suffix))
    return generated


def main() -> int:
    """Generate into the repository root (or ``argv[1]``)."""
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(out_dir):
        print(out_dir / path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
