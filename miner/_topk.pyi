# Stub of the private compiled kernel (cpp_ext/topk.cpp). Call miner.topk, not this module:
# it validates, converts dtypes visibly and picks the backend. Arrays here are taken as they are:
# float32 / int64, C-contiguous, no conversion (a wrong array raises TypeError).
import numpy as np
import numpy.typing as npt

def update_topk(
    scores: npt.NDArray[np.float32],  # [q, b], column j is document offset + j
    offset: int,
    vals: npt.NDArray[np.float32],  # [q, k] state, updated in place
    ids: npt.NDArray[np.int64],  # [q, k] state, updated in place
    ceiling: npt.NDArray[np.float32] | None = None,  # [q]
    floor: npt.NDArray[np.float32] | None = None,  # [q]
    exclude_indptr: npt.NDArray[np.int64] | None = None,  # [q + 1]
    exclude_ids: npt.NDArray[np.int64] | None = None,  # [nnz]
    above_ceiling: npt.NDArray[np.int64] | None = None,  # [q], incremented in place
    n_threads: int = 1,
    simd: str = "auto",  # "auto" or one of simd(); for tests
) -> None: ...
def merge_topk(
    vals: npt.NDArray[np.float32],  # [q, n]
    ids: npt.NDArray[np.int64],  # [q, n]
    k: int,
    n_threads: int = 1,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...  # [q, k], [q, k]
def simd() -> list[str]: ...  # instruction sets the scan can use on this CPU, the default first
