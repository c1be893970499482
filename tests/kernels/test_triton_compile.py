"""Every Triton kernel compiles to a cubin for sm_80 and sm_90, without a GPU.

Triton compiles ahead of time for a named target (its own ptxas is in the wheel), so a CPU
machine with triton installed checks what the interpreter cannot: that the kernels lower to
PTX, and that the GEMM's autotuning configs fit the shared memory of an A100 and an H100.
"""
import os

import pytest

from microdit.availability import triton, triton_interpret

pytestmark = [
    pytest.mark.skipif(not triton(), reason=f"{triton()!r}"),
    pytest.mark.skipif(triton_interpret(), reason="TRITON_INTERPRET=1: the kernels are interpreted, not compiled"),
]
# Shared memory per block (bytes) that the kernels may use: A100 and H100 opt-in maxima.
SMEM = {80: 166912, 90: 232448}


def compile_for(fn, signature, constexprs, arch, **options):
    import triton as tr
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return tr.compile(src, target=GPUTarget("cuda", arch, 32), options=options or None)


def ptr(dtype):
    return "*" + {"bf16": "bf16", "fp32": "fp32", "i32": "i32", "i64": "i64"}[dtype]


# The fast checks compile for the H100 (sm_90); the slow ones for the A100 too, every config.
ARCHS = [90, pytest.param(80, marks=pytest.mark.slow)]


@pytest.mark.parametrize("arch", ARCHS)
def test_token_mask_kernels_compile(arch):
    from microdit.kernels import keep_indices, mask_tokens, token_rows, unmask_tokens, unmask_unpatchify

    f, i32, i64 = "*bf16", "i32", "*i64"
    cases = [
        (mask_tokens._gather_kernel, dict(src_ptr=f, ids_ptr=i64, dst_ptr=f, R=i32, T=i32, K=i32, D=i32),
         dict(BLOCK_R=16, BLOCK_D=256)),
        (token_rows._inverse_kernel, dict(ids_ptr=i64, inv_ptr="*i32", R=i32, T=i32, K=i32), dict(BLOCK=1024)),
        (unmask_tokens._scatter_kernel, dict(src_ptr=f, inv_ptr="*i32", fill_ptr=f, dst_ptr=f, R=i32, T=i32, K=i32, D=i32),
         dict(HAS_FILL=True, BLOCK_R=16, BLOCK_D=256)),
        (unmask_unpatchify._unmask_image_kernel, dict(src_ptr=f, inv_ptr="*i32", fill_ptr=f, dst_ptr=f, K=i32, T=i32, C=i32, H=i32,
                                      W=i32, GW=i32, F=i32), dict(P=2, HAS_FILL=True, BLOCK_C=4, BLOCK_W=64)),
        (unmask_unpatchify._gather_image_kernel, dict(img_ptr=f, ids_ptr=i64, dst_ptr=f, R=i32, K=i32, C=i32, H=i32, W=i32, GW=i32,
                                      F=i32), dict(P=2, BLOCK_R=16, BLOCK_F=16)),
        (token_rows._dropped_sum_kernel, dict(src_ptr=f, inv_ptr="*i32", out_ptr="*fp32", T=i32, F=i32, C=i32, H=i32, W=i32,
                                     GW=i32), dict(IMAGE=True, P=2, BLOCK_T=64, BLOCK_F=16)),
        (keep_indices._keep_kernel, dict(noise_ptr="*fp32", ids_ptr=i64, T=i32, K=i32), dict(BLOCK_T=128, BLOCK_C=64)),
    ]
    for fn, sig, const in cases:
        assert compile_for(fn, sig, const, arch).asm["cubin"], fn.__name__


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_small_kernels_compile(arch):
    from microdit.kernels import moe as k

    f, i32 = "*bf16", "i32"
    cases = [
        (k._softmax_kernel, dict(logits_ptr=f, probs_ptr=f, R=i32, E=i32), dict(BLOCK_R=512, BLOCK_E=8)),
        (k._topk_kernel, dict(probs_ptr=f, gates_ptr=f, idx_ptr="*i64", inv_ptr="*i32", T=i32, E=i32, K=i32),
         dict(BLOCK_T=128, BLOCK_C=64)),
        (k._router_bwd_kernel, dict(probs_ptr=f, inv_ptr="*i32", dgates_ptr=f, dlogits_ptr=f, R=i32, T=i32, E=i32,
                                    K=i32), dict(BLOCK_R=512, BLOCK_E=8)),
        (k._combine_kernel, dict(y_ptr=f, inv_ptr="*i32", gates_ptr=f, out_ptr=f, B=i32, T=i32, E=i32, K=i32, D=i32),
         dict(WEIGHTED=True, BLOCK_R=16, BLOCK_D=128)),
        (k._gather_dot_kernel, dict(g_ptr=f, y_ptr=f, idx_ptr="*i64", gates_ptr=f, dy_ptr=f, dgates_ptr=f, B=i32,
                                    T=i32, E=i32, K=i32, D=i32), dict(BLOCK_R=16, BLOCK_D=128)),
    ]
    for fn, sig, const in cases:
        assert compile_for(fn, sig, const, arch).asm["cubin"], fn.__name__


# (GATHER, EPILOGUE) as moe_fwd / moe_bwd launch them: dispatch+GELU, plain, GELU', weight gradient.
VARIANTS = [(1, 1), (0, 0), (0, 2), (2, 0)]


def gemm_signature(dtype):
    p, i32 = ptr(dtype), "i32"
    return dict(a_ptr=p, b_ptr=p, c_ptr=p, aux_ptr=p, c2_ptr=p, rows_ptr="*i64", M=i32, N=i32, K=i32,
                **{s: i32 for s in ("s_ae", "s_am", "s_ak", "s_be", "s_bk", "s_bn", "s_ce", "s_cm", "s_cn", "s_re")})


def test_grouped_gemm_compiles_for_h100():
    """Every variant, bf16, the autotuner's first config, sm_90."""
    from microdit.kernels import moe as k

    cfg = k._grouped_gemm_kernel.configs[0]
    for gather, epilogue in VARIANTS:
        const = dict(GATHER=gather, EPILOGUE=epilogue, PRECISION=None, **cfg.kwargs)
        kernel = compile_for(k._grouped_gemm_kernel.fn, gemm_signature("bf16"), const, 90,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        assert kernel.asm["cubin"] and kernel.metadata.shared <= SMEM[90]


@pytest.mark.slow
@pytest.mark.parametrize("arch,dtype,variants", [(80, "bf16", VARIANTS), (90, "fp32", VARIANTS[:1])],
                         ids=["sm80-bf16", "sm90-fp32"])
def test_grouped_gemm_smallest_config_fits(arch, dtype, variants):
    """The autotuner's smallest config compiles and fits an A100 (bf16), and float32's IEEE
    products compile for the H100; larger configs that do not fit are skipped at autotuning."""
    from microdit.kernels import moe as k

    gemm = k._grouped_gemm_kernel
    def smem_tiles(c):  # elements of A and B tiles in flight
        m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        return (m * k + k * n) * c.num_stages

    cfg = min(gemm.configs, key=smem_tiles)
    for gather, epilogue in variants:
        const = dict(GATHER=gather, EPILOGUE=epilogue, PRECISION="ieee" if dtype == "fp32" else None, **cfg.kwargs)
        kernel = compile_for(gemm.fn, gemm_signature(dtype), const, arch, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages)
        assert kernel.asm["cubin"] and kernel.metadata.shared <= SMEM[arch], (gather, epilogue, kernel.metadata.shared)
