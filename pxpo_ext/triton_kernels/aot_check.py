"""Compile the kernels for a CUDA target without a GPU: catches lowering errors the interpreter cannot.

    python -m pxpo_ext.triton_kernels.aot_check [--quick] [--arch 90]

Triton's interpreter runs the kernels as numpy code, so it never checks that they lower to
PTX. This compiles every variant the launchers can ask for (granularity, loss type, dtype,
weights, layout, tiny and full tiles) with the ``ptxas`` bundled in the triton wheel.
``TRITON_INTERPRET`` must be unset. ``--quick`` compiles one variant per kernel.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

DTYPES = ("fp32", "fp16", "bf16")


def _variants(quick: bool):
    """``(kernel, {arg: type}, {constexpr: value})`` for every launch configuration."""
    from . import logprob, loss, pooling

    def pick(options):
        return options[:1] if quick else options

    for gran, dt, flat, (bc, bp) in itertools.product(pick((1, 0, 2)), pick(DTYPES), pick((True, False)),
                                                      pick(((4, 512), (1, 1)))):
        types = dict(x_ptr=f"*{dt}", mean_ptr=f"*{dt}", std_ptr="*fp32", out_ptr="*fp32", inv_units="fp32",
                     gout_ptr="*fp32", grad_ptr=f"*{dt}")
        tile = dict(GRAN=gran, X_FLAT=flat, M_FLAT=flat, BLOCK_C=bc, BLOCK_P=bp)
        yield logprob._logprob_fwd_kernel, types, tile
        yield logprob._logprob_bwd_kernel, types, tile
    loss_options = (pick((1, 0)), pick((0, 1)), pick((True, False)), pick((False, True)), pick(DTYPES))
    for gran, loss_type, has_weight, per_element, dt in itertools.product(*loss_options):
        if per_element and gran != 0:
            continue
        types = dict(x_ptr=f"*{dt}", mean_ptr=f"*{dt}", std_ptr="*fp32", lpo_ptr="*fp32", adv_ptr="*fp32",
                     weight_ptr="*fp32", grad_ptr=f"*{dt}", part_ptr="*fp32", inv_batch="fp32", inv_units="fp32",
                     unweighted_norm="fp32", lo="fp32", hi="fp32", eps="fp32")
        yield loss._loss_kernel, types, dict(GRAN=gran, LOSS_TYPE=loss_type, HAS_WEIGHT=has_weight,
                                             ADV_PER_ELEMENT=per_element, X_FLAT=True, M_FLAT=has_weight,
                                             BLOCK_C=4, BLOCK_P=512)
        if gran == 1 and has_weight and not per_element:
            yield loss._ddpo_loss_kernel, types, dict(LOSS_TYPE=loss_type, X_FLAT=True, M_FLAT=False, BLOCK_C=4,
                                                      BLOCK_P=512)
    for block in pick((1024, 1)):
        yield loss._finalize_kernel, dict(part_ptr="*fp32", loss_ptr="*fp32", stats_ptr="*fp32"), dict(BLOCK=block)
    for has_weight, (block_j, kw) in itertools.product(pick((True, False)), pick(((64, 8), (1, 1)))):
        types = dict(reward_ptr="*fp32", weight_ptr="*fp32", r_out_ptr="*fp32", w_out_ptr="*fp32")
        yield pooling._pool_kernel, types, dict(HAS_WEIGHT=has_weight, BLOCK_J=block_j, KW=kw)


def compile_all(quick: bool = False, arch: int = 90) -> int:
    """Compile the variants for ``sm_<arch>``; returns how many. Raises on the first that fails."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    count = 0
    for kernel, types, consts in _variants(quick):
        signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in kernel.arg_names}
        try:
            triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts), target=target,
                           options={"num_warps": 4})
        except Exception as e:
            raise RuntimeError(f"{kernel.__name__} with {consts} does not compile for sm_{arch}: {e}") from e
        count += 1
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one variant per kernel")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80 or 90")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler this check exercises")
    start = time.perf_counter()
    count = compile_all(args.quick, args.arch)
    print(f"{count} kernel variants compile for sm_{args.arch} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
