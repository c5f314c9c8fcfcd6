"""Compile every Triton kernel variant for a GPU target, without a GPU.

``python -m piece_optim.kernels.aot_check [--arch 90]`` lowers each kernel, for every
dtype/flag combination the launchers use, to PTX and a cubin (Triton's bundled ptxas),
and checks the PTX has no approximate instruction (``.approx``: fast sqrt/division),
i.e. that ``sqrt_rn``/``div_rn`` and the disabled fp fusion hold.  It proves the kernels
compile; it measures nothing.  Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import sys


def _variants(tl):  # noqa: ANN001, ANN202
    from . import accumulate, adamw, compact, histogram, score

    def p(t: str) -> str:
        return "*" + t

    out = []
    for gdt in ("fp32", "bf16", "fp16"):
        for adt in ("fp32", "bf16"):
            for has_g in (False, True):
                for sr in (False, True) if adt == "bf16" else (False,):
                    out.append(
                        (
                            f"accumulate g={gdt} acc={adt} sum_g={has_g} stochastic={sr}",
                            accumulate._accumulate_kernel,
                            dict(g_ptr=p(gdt), s1_ptr=p(adt), s2_ptr=p(adt), n="i64", key="i64"),
                            dict(HAS_SUM_G=has_g, STOCHASTIC=sr, BLOCK=accumulate.BLOCK),
                        )
                    )
    out.append(
        (
            "accumulate_many bf16/bf16 stochastic",
            accumulate._accumulate_many_kernel,
            dict(table_ptr="*i64", prog_tensor_ptr="*i64", prog_start_ptr="*i64"),
            dict(
                G_DTYPE=tl.bfloat16,
                ACC_DTYPE=tl.bfloat16,
                HAS_SUM_G=True,
                STOCHASTIC=True,
                BLOCK=accumulate.BLOCK,
            ),
        )
    )
    for mode, sdt in ((0, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")):
        sums = dict(sc_ptr="*fp32", g_ptr=p(sdt), g2_ptr=p(sdt))
        out.append(
            (
                f"histogram mode={mode} {sdt}",
                histogram._histogram_kernel,
                {
                    **sums,
                    "hist_ptr": "*i64",
                    "n": "i64",
                    "eps": "fp32",
                    "shift": "i32",
                    "prefix": "i32",
                },
                dict(MODE=mode, BLOCK=histogram.BLOCK),
            )
        )
        out.append(
            (
                f"compact_count mode={mode} {sdt}",
                compact._compact_count_kernel,
                {
                    **sums,
                    "gt_ptr": "*i64",
                    "eq_ptr": "*i64",
                    "n": "i64",
                    "eps": "fp32",
                    "thr": "i64",
                },
                dict(MODE=mode, BLOCK=compact.BLOCK),
            )
        )
        for idt in ("i32", "i64"):
            out.append(
                (
                    f"compact mode={mode} {sdt} idx={idt}",
                    compact._compact_kernel,
                    {
                        **sums,
                        "eq_before_ptr": "*i64",
                        "out_off_ptr": "*i64",
                        "out_ptr": p(idt),
                        "n": "i64",
                        "eps": "fp32",
                        "thr": "i64",
                        "take_eq": "i64",
                    },
                    dict(MODE=mode, BLOCK=compact.BLOCK),
                )
            )
        if mode:
            out.append(
                (
                    f"score mode={mode} {sdt}",
                    score._score_kernel,
                    dict(g_ptr=p(sdt), g2_ptr=p(sdt), out_ptr="*fp32", n="i64", eps="fp32"),
                    dict(MODE=mode, BLOCK=score.BLOCK),
                )
            )
    scalars = dict(
        decay="fp32",
        lerp_c="fp32",
        lerp_small="i32",
        beta2="fp32",
        one_m_beta2="fp32",
        bc2_sqrt="fp32",
        eps="fp32",
        neg_step_size="fp32",
    )
    for pdt, gdt, master in (
        ("fp32", "fp32", False),
        ("bf16", "bf16", True),
        ("fp16", "fp16", True),
        ("bf16", "fp32", False),
    ):
        for has_idx, sparse, idt in (
            (True, False, "i32"),
            (True, True, "i64"),
            (False, False, "i32"),
        ):
            out.append(
                (
                    f"adamw p={pdt} g={gdt} master={master} idx={has_idx and idt} "
                    f"sparse_grad={sparse}",
                    adamw._adamw_kernel,
                    dict(
                        p_ptr=p(pdt),
                        g_ptr=p(gdt),
                        i_ptr=p(idt),
                        m_ptr="*fp32",
                        v_ptr="*fp32",
                        w_ptr="*fp32",
                        err_ptr="*i32",
                        n="i64",
                        numel="i64",
                        **scalars,
                    ),
                    dict(HAS_IDX=has_idx, GRAD_SPARSE=sparse, HAS_MASTER=master, BLOCK=adamw.BLOCK),
                )
            )
    out.append(
        (
            "adamw_many bf16+master idx=i32",
            adamw._adamw_many_kernel,
            dict(
                table_ptr="*i64",
                prog_tensor_ptr="*i64",
                prog_start_ptr="*i64",
                err_ptr="*i32",
                **scalars,
            ),
            dict(
                P_DTYPE=tl.bfloat16,
                G_DTYPE=tl.float32,
                I_DTYPE=tl.int32,
                HAS_IDX=True,
                GRAD_SPARSE=False,
                HAS_MASTER=True,
                BLOCK=adamw.BLOCK,
            ),
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot_check compiles real kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for name, fn, sig, const in _variants(tl):
        signature = {**sig, **{k: "constexpr" for k in const}}
        try:
            kernel = triton.compile(
                ASTSource(fn, signature, const), target=target, options={"enable_fp_fusion": False}
            )
            ptx = kernel.asm["ptx"]
            approx = ptx.count(".approx")
            status = "ok" if approx == 0 else f"FAIL: {approx} approximate instructions"
            failures += approx != 0
            print(
                f"{status:4} sm_{args.arch} {name}: fma {ptx.count('fma.rn')}, "
                f"sqrt.rn {ptx.count('sqrt.rn')}, div.rn {ptx.count('div.rn')}, "
                f"red/atom {ptx.count('red.') + ptx.count('atom.')}"
            )
        except Exception as exc:  # noqa: BLE001 - report every variant, then fail
            failures += 1
            print(f"FAIL sm_{args.arch} {name}: {type(exc).__name__}: {exc}")
    print(f"{failures} failure(s)")
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
