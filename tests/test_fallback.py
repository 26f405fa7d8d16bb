"""Without the native extension, sparsefl still imports, warns once why, and runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_without_extension_falls_back_to_reference():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["sparsefl._C"] = None  # makes `from sparsefl import _C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import sparsefl
            import torch
            from sparsefl.ops import _backend
            out = [torch.empty(3)]
            n = sparsefl.ops.sam_perturb([torch.ones(3)], [torch.ones(3)], out, 0.1)
        msgs = [str(w.message) for w in caught if "sparsefl" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "could not be loaded" in msgs[0] and "reference" in msgs[0], msgs[0]
        assert _backend.resolve("auto", out) == "reference"
        try:
            _backend.resolve("cpp", out)
        except RuntimeError as e:
            assert "unavailable" in str(e)
        else:
            raise AssertionError("cpp must be reported unavailable")
        print("ok", float(n))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")
