"""The Triton kernel of ``llama.gpu_matvec`` (its docstring says what it computes and when it runs).

A module of its own because it imports Triton at the top, which only CUDA runs need:
``llama.gpu_matvec`` imports this module on first use. ``TRITON_INTERPRET=1`` (set before this
import) runs the kernel on the CPU through Triton's interpreter, as the tests do.
"""

import triton
import triton.language as tl


@triton.jit
def _matvec_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
    HAS_SCALE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # y [M, N] = x [M, K] @ w [N, K].T (x scale [N]); this program: outputs n, all M (<= ROWS) rows.
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    rows = tl.arange(0, ROWS)  # [ROWS]
    n_ok = n < N
    acc = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = k < K
        w = tl.load(w_ptr + n[:, None] * stride_w + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        w = w.to(tl.float32)  # [BLOCK_N, BLOCK_K], read once for every row
        for r in tl.static_range(ROWS):
            x = tl.load(x_ptr + r * stride_x + k, mask=k_ok & (r < M), other=0).to(tl.float32)  # [BLOCK_K]
            part = tl.sum(w * x[None, :], axis=1)  # [BLOCK_N]
            acc += tl.where(rows[None, :] == r, part[:, None], 0.0)
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + n, mask=n_ok, other=0).to(tl.float32)[:, None]
    out = y_ptr + rows[None, :] * stride_y + n[:, None]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & (rows[None, :] < M))
