"""Read files the way one real consumer does and print what it saw, one JSON line per file.

Run as a child process: a failed read inside an mmap kills the reader with SIGBUS, which must show up
as an exit status, not as a crashed test run. A Python exception is reported as
{"error": type name, "errno": ..., "message": ...} with exit status 0.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import threading

import numpy as np

# safetensors dtype codes of the numpy dtypes the tests write.
NUMPY_DTYPE_CODES = {"float32": "F32", "float16": "F16", "int64": "I64", "bool": "BOOL", "uint8": "U8"}
O_DIRECT_BLOCK = 64 * 1024  # several requests per file, each aligned as O_DIRECT demands


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def describe_arrays(arrays: dict[str, np.ndarray], metadata: dict | None = None) -> dict:
    return {
        "metadata": metadata,
        "tensors": {name: [NUMPY_DTYPE_CODES[str(a.dtype)], list(a.shape), sha256(a.tobytes())]
                    for name, a in arrays.items()},
    }


def describe_file_bytes(data) -> dict:
    return {"size": len(data), "sha256": sha256(data)}


def safe_open_np(path: str, backend: str | None = None) -> dict:
    from safetensors import safe_open

    kwargs = {"backend": backend} if backend else {}
    with safe_open(path, framework="np", **kwargs) as f:
        return describe_arrays({name: f.get_tensor(name) for name in f.keys()}, f.metadata())


def safe_open_pt(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return describe_arrays({name: f.get_tensor(name).numpy() for name in f.keys()}, f.metadata())


def safe_open_pread(path: str) -> dict:
    return safe_open_np(path, backend="pread")


def load_file_pt(path: str) -> dict:
    from safetensors.torch import load_file

    return describe_arrays({name: t.numpy() for name, t in load_file(path).items()})


def load_bytes_pt(path: str) -> dict:
    """The no-mmap path of transformers (disable_mmap), diffusers and vLLM's eager loading."""
    from safetensors.torch import load

    with open(path, "rb") as f:
        return describe_arrays({name: t.numpy() for name, t in load(f.read()).items()})


def memmap_r(path: str) -> dict:
    return describe_file_bytes(np.memmap(path, dtype=np.uint8, mode="r").tobytes())


def memmap_c(path: str) -> dict:
    array = np.memmap(path, dtype=np.uint8, mode="c")
    seen = array.tobytes()
    array[0] ^= 0xFF  # copy-on-write: allowed on a read-only file, never reaches it
    return describe_file_bytes(seen)


def plain_read(path: str) -> dict:
    with open(path, "rb") as f:
        return describe_file_bytes(f.read())


def o_direct_bytes(path: str) -> bytes:
    """Read with O_DIRECT into a page-aligned buffer (an anonymous mmap), as GPU-direct loaders do."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buffer = mmap.mmap(-1, O_DIRECT_BLOCK)
    parts, offset = [], 0
    try:
        while True:
            count = os.preadv(fd, [buffer], offset)
            parts.append(buffer[:count])
            offset += count
            if count < O_DIRECT_BLOCK:
                return b"".join(parts)
    finally:
        buffer.close()
        os.close(fd)


def o_direct(path: str) -> dict:
    return describe_file_bytes(o_direct_bytes(path))


def mmap_bytes(path: str) -> bytes:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        return bytes(mapped)


def buffered_bytes(path: str) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return b"".join(iter(lambda: f.read(64 * 1024), b""))


def concurrent_readers(directory: str, threads: str, *names: str) -> dict:
    """`threads` threads each read every file once, each starting at a different file and using a
    different read path; returns every distinct digest seen per file (one each when all is well)."""
    readers = [buffered_bytes, o_direct_bytes, mmap_bytes]
    seen: dict[str, set[str]] = {name: set() for name in names}
    errors: list[str] = []
    mutex = threading.Lock()
    barrier = threading.Barrier(int(threads))

    def work(index: int) -> None:
        barrier.wait()  # all threads start together, so reads overlap
        for step in range(len(names)):
            name = names[(index + step) % len(names)]
            reader = readers[(index + step) % len(readers)]
            try:
                digest = sha256(reader(os.path.join(directory, name)))
            except OSError as exc:
                digest, error = None, f"{reader.__name__} {name}: {exc!r}"
            with mutex:
                if digest is None:
                    errors.append(error)
                else:
                    seen[name].add(digest)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(int(threads))]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return {"digests": {name: sorted(digests) for name, digests in seen.items()}, "errors": errors}


FILE_CONSUMERS = {
    "safe_open_np": safe_open_np,
    "safe_open_pt": safe_open_pt,
    "safe_open_pread": safe_open_pread,
    "load_file_pt": load_file_pt,
    "load_bytes_pt": load_bytes_pt,
    "memmap_r": memmap_r,
    "memmap_c": memmap_c,
    "read": plain_read,
    "o_direct": o_direct,
}


def report(consumer, *args: str) -> dict:
    try:
        return consumer(*args)
    except Exception as exc:
        return {"error": type(exc).__name__, "errno": getattr(exc, "errno", None), "message": str(exc)}


def main(kind: str, *args: str) -> None:
    """`KIND PATH...`: one JSON line per path, in order; `threads DIR COUNT NAME...`: one line in all."""
    if kind == "threads":
        print(json.dumps(report(concurrent_readers, *args)), flush=True)
        return
    for path in args:
        print(json.dumps(report(FILE_CONSUMERS[kind], path)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
