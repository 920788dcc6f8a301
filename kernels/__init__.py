"""Triton kernels (plain @triton.jit functions); their torch ops live in milenas_fast.ops."""
