"""pycurv._cuda: the Lanczos state with its float64 Krylov basis on a CUDA device.

Built when CMake finds a CUDA compiler (PYCURV_CUDA=AUTO|ON), or as a CPU
emulation for tests (PYCURV_CUDA=EMULATE). Imported only by pycurv._gpu, when
an operator's vectors live on a GPU. Same protocol as pycurv._core.LanczosState:
advance() returns a Request; MATVEC is answered with set_matvec_output().
"""

from typing import Any, Optional

import numpy as np

from ._core import NonFiniteError as _CoreNonFiniteError
from ._core import Request as Request

class NonFiniteError(_CoreNonFiniteError): ...

class DeviceArray:
    """An array in device memory, exported zero-copy (DLPack, __cuda_array_interface__ v3)."""

    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...  # "float64" (the state's vectors), or float32/float16/bfloat16 (from_numpy)
    @property
    def device(self) -> str: ...  # "cuda:N"
    @property
    def ptr(self) -> int: ...
    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...  # not for bfloat16
    def __dlpack__(self, *, stream: Optional[int] = None, max_version: Any = None, dl_device: Any = None,
                   copy: Optional[bool] = None) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...  # (2, N): kDLCUDA
    def __len__(self) -> int: ...
    def numpy(self) -> np.ndarray: ...  # host copy; bfloat16 comes back as float32
    @staticmethod
    def from_numpy(a: np.ndarray, device: int = 0, dtype: Optional[str] = None) -> "DeviceArray": ...

class LanczosState:
    def __init__(self, *, n_local: int, n_global: int, offset: int, k: int, ncv: int, which: int, tol: float,
                 max_matvecs: int, seed: int, start_given: bool, check_multiplicity: bool,
                 explicit_residuals: bool, want_vectors: bool, yield_reduce: bool, unit_roundoff: float,
                 device: int, stream: int = 0, host_basis: bool = False,
                 stream_owner: Any = None,  # kept alive while the state and its vectors live
                 tol_on_eigenvalue: bool = False, min_matvecs: int = 0) -> None: ...
    def advance(self) -> Request: ...
    def set_start_vector(self, v0: Any) -> None: ...
    def matvec_input(self) -> DeviceArray: ...  # a view of a basis vector: do not write to it
    def set_matvec_output(self, w: Any) -> None: ...  # device array (f64/f32/f16/bf16, any stride) or host array
    def reduce_buffer(self) -> np.ndarray: ...  # host float64, summed over processes in place on REDUCE
    def stop(self) -> None: ...
    def basis(self, count: int) -> DeviceArray: ...  # a device copy of the first count vectors
    def eigenvectors(self) -> DeviceArray: ...  # (k, n), a device buffer of its own
    def values(self) -> np.ndarray: ...
    def residuals(self) -> np.ndarray: ...
    def error_bounds(self) -> np.ndarray: ...
    def current_values(self) -> np.ndarray: ...
    def current_residuals(self) -> np.ndarray: ...
    def set_unit_roundoff(self, u: float) -> None: ...
    def history(self) -> dict[str, np.ndarray]: ...
    device: int
    stream: int
    host_basis: bool
    device_bytes: int
    matvec_seconds: float  # device time of the products (events on the stream)
    status: int
    n_matvecs: int
    n_restarts: int
    n_breakdowns: int
    n_pass3: int
    n_verify_rounds: int
    basis_size: int
    n_locked: int
    bytes_moved: float
    anorm: float
    noise_level: float
    asymmetry: float
    max_h2_ratio: float
    residuals_explicit: bool

def devices() -> list[dict[str, Any]]: ...  # index, name, total_memory, compute_capability, multiprocessors
def device_error() -> str: ...
def build_info() -> dict[str, Any]: ...  # cuda_runtime, cuda_driver, architectures, emulated
def read_bandwidth(n: int = ..., repeats: int = 5, device: int = 0) -> float: ...
def host_syncs() -> int: ...  # emulated builds only: host waits on the device so far
