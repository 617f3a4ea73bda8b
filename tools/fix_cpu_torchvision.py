"""Make the PyPI (CUDA) torchvision importable next to a CPU-only torch.

torchvision's ``_meta_registrations.py`` registers fake kernels for ``torchvision::nms``/``qnms`` at import.
With a CPU torch the compiled ops are missing and the import fails with
"operator torchvision::nms does not exist", which also breaks open_clip and parts of transformers.
We guard exactly those registrations so they are skipped when the op does not exist. Idempotent; a no-op
when torch has CUDA or torchvision imports already.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

GUARD_NAME = "_cclm_register_fake_if_op_exists"
GUARD = f"""
def {GUARD_NAME}(name):  # added by cclm tools/fix_cpu_torchvision.py
    namespace, op = name.split("::")
    if not hasattr(getattr(torch.ops, namespace), op):
        return lambda fn: fn
    return torch.library.register_fake(name)
"""


def torchvision_imports() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    return probe.returncode == 0


def main() -> int:
    if torchvision_imports():
        return 0
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision is not installed; nothing to fix")
        return 0
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if GUARD_NAME not in text:
        patched, count = re.subn(
            r'@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)',
            lambda m: f'@{GUARD_NAME}("torchvision::{m.group(1)}")',
            text,
        )
        if count == 0:
            print(f"unexpected layout of {path}: no nms/qnms registrations found", file=sys.stderr)
            return 1
        anchor = "\n\n@register_meta"
        head, sep, tail = patched.partition(anchor)
        path.write_text(head + "\n" + GUARD + sep + tail)
    if not torchvision_imports():
        print("torchvision still fails to import after the CPU fix", file=sys.stderr)
        return 1
    print(f"patched {path} for CPU-only torch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
