"""Triton kernels of the pxpo ops and their launchers (imported only when triton is installed).

``common`` holds the ``@triton.jit`` helpers every kernel shares, ``launch`` the block-size
choices and the launch wrapper, and one module per op: ``logprob``, ``pooling``, ``loss``.
``library`` registers them as ``torch.ops.pxpo_triton.*``; :mod:`pxpo_ext._triton` is the backend on top.
``aot_check`` compiles every kernel variant for a CUDA target without a GPU.
"""
