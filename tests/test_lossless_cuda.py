"""The numba CUDA decoder and fused decode + matmul kernel, run under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) in a subprocess: numba
reads that variable when ``numba.cuda`` is first imported, so it cannot be switched on in this process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import numpy as np, torch
    from modelpress.errors import CorruptData
    from modelpress.kernels import entropy as E, entropy_cuda as G
    rng = np.random.default_rng(0)
    cases = [
        ("bfloat16", torch.int16, np.uint16, torch.bfloat16, 1500, 200),
        ("float16", torch.int16, np.uint16, torch.float16, 700, 128),
        ("float32", torch.int32, np.uint32, torch.float32, 500, 100),
    ]
    for dtype, ib, wd, td, n, lane in cases:
        x = torch.from_numpy((rng.standard_normal(n) * 0.02).astype(np.float32)).to(td)
        w = x.view(ib).numpy().view(wd).copy()
        w[:6] = rng.integers(0, np.iinfo(wd).max, size=6, dtype=wd)   # arbitrary patterns, NaN payloads
        if wd is np.uint16:
            w[6:10] = [0x7F80, 0xFFC1, 0x8000, 0x0001]
        for raw_sign in (False, True):   # version 6: the sign stored raw (DFloat11's layout with mantissa bits 0)
            enc = E.encode_reference(w, dtype, lane_size=lane, sym_mant_bits=0 if raw_sign else 2, raw_sign=raw_sign)
            ref = E.decode_reference(enc)
            for staged in (False, True):
                dec = G.CudaDecoder(E.validate(enc), sub=lane // 4, threads=16, staged=staged)
                assert dec.staged == staged   # the sub-lane size divides the lane size, so staging applies
                got = dec.decode().copy_to_host()
                assert got.dtype == wd and np.array_equal(got, ref) and np.array_equal(got, w), (dtype, staged)
        # a sub-lane size that does not tile the lane falls back to the plain kernel
        assert not G.CudaDecoder(E.validate(enc), sub=lane // 4 + 1, threads=16, staged=True).staged
    # empty tensor and a one-symbol tensor
    for w in (np.zeros(0, np.uint16), np.full(100, 0x3F80, np.uint16)):
        for staged in (False, True):
            got = G.decode(E.encode_reference(w, "bfloat16", lane_size=40), sub=8, threads=8, staged=staged)
            assert np.array_equal(got, w)
    # corrupt stream that skips checksums: clamped reads, lanes that end in the wrong place are reported
    w = (rng.standard_normal(400).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    enc = E.encode_reference(w, "bfloat16", lane_size=100)
    bad = E.Encoded(enc.header, enc.codebook, enc.lane_nbytes, enc.checksums, np.full_like(enc.stream, 0xFF))
    try:
        G.CudaDecoder(E.validate(bad, verify_checksums=False), sub=16, threads=8)
        raise SystemExit("corrupt stream was not detected")
    except CorruptData as exc:
        assert "do not end where" in str(exc)
    print("CUDASIM-OK")
''')


def run_under_simulator(script: str, marker: str) -> None:
    """Run ``script`` in a fresh interpreter with the CUDA simulator on; it must print ``marker``."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert marker in proc.stdout


def test_cuda_decoder_matches_reference_under_simulator() -> None:
    run_under_simulator(SCRIPT, "CUDASIM-OK")


FUSED_SCRIPT = textwrap.dedent('''
    import numpy as np, torch
    from modelpress.kernels import entropy as E, entropy_cpu as C, entropy_cuda as G
    rng = np.random.default_rng(0)
    # the raw-sign case (format version 6) is small: it shares every line of the kernel but the raw bits' place
    for dtype, ib, wd, td, raw_sign, n_rows, cases in (
            ("bfloat16", torch.int16, np.uint16, torch.bfloat16, False, 10, ((1, True), (3, False))),
            ("bfloat16", torch.int16, np.uint16, torch.bfloat16, True, 2, ((1, True),)),
            ("float32", torch.int32, np.uint32, torch.float32, False, 10, ((1, True), (3, False)))):
        k_len = 48
        w = torch.from_numpy((rng.standard_normal((n_rows, k_len)) * 0.05).astype(np.float32)).to(td)
        w.view(-1)[:3] = torch.tensor([-0.0, 1e-40, 300.0]).to(td)
        words = w.view(ib).numpy().reshape(-1).view(wd).copy()
        enc = C.encode(words, dtype, lane_size=2 * k_len, sym_mant_bits=0 if raw_sign else 2, row_len=k_len,
                       raw_sign=raw_sign)
        dec = G.CudaDecoder(E.validate(enc), sub=16, threads=64)
        assert dec.fused_ok(k_len) and not dec.fused_ok(k_len // 2)
        for batch, with_bias in cases:
            x = rng.standard_normal((batch, k_len)).astype(np.float32)
            bias = rng.standard_normal(n_rows).astype(np.float32) if with_bias else None
            got = dec.linear(x, bias).copy_to_host()
            ref = E.linear_reference(w.float().numpy(), x, bias)
            assert np.array_equal(got, ref), (dtype, batch, np.abs(got - ref).max())
            assert np.array_equal(got, C.fused_linear(E.validate(enc), x, bias))   # CPU kernel: same bits
    print("FUSED-OK")
''')


def test_fused_cuda_kernel_matches_reference_under_simulator() -> None:
    """Fused decode + matmul on the GPU: bit-identical to the numpy reference and to the CPU kernel."""
    run_under_simulator(FUSED_SCRIPT, "FUSED-OK")
