"""Compiles each CUDA source the server compiles at start-up (src/kernels/*.cu) with the real
NVRTC, as cudarc's compile_ptx does (no options), and checks that every `extern "C"` kernel is
in the PTX: a kernel NVRTC rejects fails here, on a machine without a GPU, not on a GPU's
start-up.

    python3 .ci/nvrtc-check.py path/to/libnvrtc.so.13 src/kernels/*.cu
"""
import ctypes, re, sys

lib = ctypes.CDLL(sys.argv[1])
failed = False
for path in sys.argv[2:]:
    src = open(path, "rb").read()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, path.encode(), 0, None, None) == 0
    rc = lib.nvrtcCompileProgram(prog, 0, None)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        print(f"{path}: NVRTC error {rc}\n{log.value.decode()}")
        failed = True
        continue
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    ptx = ptx.value.decode()
    kernels = re.findall(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(', src.decode())
    missing = [k for k in kernels if f".entry {k}(" not in ptx]
    if not kernels or missing:
        print(f"{path}: kernels {kernels}, missing from the PTX: {missing}")
        failed = True
        continue
    print(f"{path}: NVRTC compiled {', '.join(kernels)} ({len(ptx)} bytes of PTX)")
sys.exit(1 if failed else 0)
