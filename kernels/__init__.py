"""Triton kernels, installed as ``fastmask.kernels``.

One op family per file: the ``@triton.jit`` kernels, their launchers and the autograd Functions side
by side.  Users call ``fastmask.ops``, which checks inputs and picks the backend; the functions here
assume valid input.  Files: ``token_gather`` (gather/scatter/random masking/mask token),
``cls_attention`` (flash attention that exports the CLS map), ``topk_mask`` (top-k and AttMask masks).
"""
