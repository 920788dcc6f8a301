"""The one pointer-picking helper of the kernels (absolute imports: tests load kernel files on their own)."""
import triton
import triton.language as tl


@triton.jit
def pick(ptrs, k, K: tl.constexpr):
    """Pointer k of the tuple `ptrs` (K long). A run-time k (a program id) costs a branch per entry; a compile-time
    k (a static_range index) folds to that entry."""
    p = ptrs[0]
    for i in tl.static_range(1, K):
        if k == i:
            p = ptrs[i]
    return p
