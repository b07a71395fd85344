"""Without Triton, dabdetr still imports, ``dabdetr.kernels`` reports the backend unavailable (with
the reason), ``backend="triton"`` raises a BackendError saying why, and the automatic choice works.

Runs in the plain CPU suite (no GPU, no interpreter needed): a subprocess hides the ``triton``
package (``sys.modules["triton"] = None`` makes every ``import triton`` fail).
"""

import os
import subprocess
import sys
import textwrap

_CODE = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # as if Triton were not installed
    import torch
    import dabdetr
    import dabdetr.kernels as K
    from dabdetr import ops
    from dabdetr.ops import reference
    assert not K.AVAILABLE
    assert "Triton is not importable" in K.UNAVAILABLE_REASON, K.UNAVAILABLE_REASON
    for op in ("sine_embed", "modulated_sine_query", "content_position_attention"):
        assert "triton" not in ops.available_backends("cpu", op), op
    x = torch.rand(3, 4)
    try:
        ops.sine_embed(x, 8, backend="triton")
    except ops.BackendError as exc:
        assert "Triton is not importable" in str(exc), str(exc)
    else:
        raise AssertionError("backend='triton' did not raise")
    torch.testing.assert_close(ops.sine_embed(x, 8), reference.sine_embed(x, 8, (10000.0,) * 4))
    q = torch.randn(1, 3, 2, 4)
    out = ops.content_position_attention(q, q, q, q, q)
    assert out.shape == (1, 3, 2, 4)
    print("ok")
    """
)


def test_package_works_without_triton():
    env = dict(os.environ, TRITON_INTERPRET="1")  # so that only the missing package can be the reason
    env.pop("DABDETR_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.stdout.strip().endswith("ok")
