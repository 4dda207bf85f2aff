"""Check a built wheel: Triton kernels inside, CUDA sources outside, sm_90a code when CUDA is on."""

import sys
import zipfile


def main(path: str) -> int:
    names = zipfile.ZipFile(path).namelist()
    so = [n for n in names if n.startswith("dmdr_fast/_C") and n.endswith((".so", ".pyd"))]
    assert so, f"no compiled _C in {path}"
    assert "dmdr_fast/kernels/dmd_loss.py" in names, "Triton kernels missing from the wheel"
    assert not any(n.endswith(".cu") for n in names), "CUDA sources must not ship in the wheel"
    blob = zipfile.ZipFile(path).read(so[0])
    cuda = b"dmdr_fast CUDA error" in blob
    if cuda:
        assert b"sm_90a" in blob, "CUDA build without sm_90a code"
    print(f"{path}: ok ({len(names)} files, _C with {'CUDA incl. sm_90a' if cuda else 'CPU kernels only'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
