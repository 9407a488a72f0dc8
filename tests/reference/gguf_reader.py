"""A small, independent GGUF (v2/v3) reader: metadata and tensors as NumPy arrays.

Part of backprompt's NumPy reference oracle. It shares no code with the C++ reader on purpose:
the two are checked against each other.

Layout of a GGUF file (all little-endian):
    magic "GGUF", u32 version, u64 n_tensors, u64 n_kv
    n_kv x { string key, u32 value_type, value }
    n_tensors x { string name, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset }
    padding to general.alignment (default 32), then the data section
A string is a u64 byte length then UTF-8 bytes. ne[0] is the innermost (contiguous) dimension,
so a tensor with ne = [in, out] is returned as an array of shape (out, in).
"""

import struct

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Metadata value types.
_SCALAR_FORMATS = {
    0: "<B",   # UINT8
    1: "<b",   # INT8
    2: "<H",   # UINT16
    3: "<h",   # INT16
    4: "<I",   # UINT32
    5: "<i",   # INT32
    6: "<f",   # FLOAT32
    7: "<?",   # BOOL
    10: "<Q",  # UINT64
    11: "<q",  # INT64
    12: "<d",  # FLOAT64
}
_TYPE_STRING = 8
_TYPE_ARRAY = 9

# Tensor types (ggml_type ids) this reader understands.
TYPE_F32 = 0
TYPE_F16 = 1
TYPE_Q8_0 = 8
TYPE_BF16 = 30
TYPE_NAMES = {TYPE_F32: "f32", TYPE_F16: "f16", TYPE_Q8_0: "q8_0", TYPE_BF16: "bf16"}
Q8_0_BLOCK = 32


class GgufError(Exception):
    pass


class _Cursor:
    def __init__(self, buf, path):
        self.buf = buf
        self.pos = 0
        self.path = path

    def take(self, n):
        if self.pos + n > len(self.buf):
            raise GgufError(f"{self.path}: truncated at offset {self.pos} (need {n} bytes)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size))[0]

    def string(self):
        n = self.scalar("<Q")
        return bytes(self.take(n)).decode("utf-8", errors="surrogateescape")

    def value(self, vtype):
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        if vtype == _TYPE_STRING:
            return self.string()
        if vtype == _TYPE_ARRAY:
            elem_type = self.scalar("<I")
            n = self.scalar("<Q")
            if elem_type in _SCALAR_FORMATS:
                dtype = np.dtype(_SCALAR_FORMATS[elem_type])
                raw = self.take(n * dtype.itemsize)
                return np.frombuffer(raw, dtype=dtype).tolist()
            return [self.value(elem_type) for _ in range(n)]
        raise GgufError(f"{self.path}: unknown metadata value type {vtype} at offset {self.pos}")


class TensorInfo:
    def __init__(self, name, ne, ggml_type, offset):
        self.name = name
        self.ne = ne            # ne[0] innermost
        self.type = ggml_type
        self.offset = offset    # relative to the data section

    @property
    def n_elements(self):
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def n_bytes(self):
        n = self.n_elements
        if self.type == TYPE_F32:
            return 4 * n
        if self.type in (TYPE_F16, TYPE_BF16):
            return 2 * n
        if self.type == TYPE_Q8_0:
            return (n // Q8_0_BLOCK) * (2 + Q8_0_BLOCK)
        raise GgufError(f"tensor {self.name}: unsupported type {self.type}")


class GgufFile:
    """Reads the whole file into memory; `metadata` is a dict, `tensors` a dict of TensorInfo."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.buf = memoryview(f.read())
        cur = _Cursor(self.buf, path)
        if bytes(cur.take(4)) != GGUF_MAGIC:
            raise GgufError(f"{path}: bad magic")
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise GgufError(f"{path}: unsupported GGUF version {self.version}")
        n_tensors = cur.scalar("<Q")
        n_kv = cur.scalar("<Q")

        self.metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.scalar("<I")
            self.metadata[key] = cur.value(vtype)

        self.tensors = {}
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            ne = [cur.scalar("<Q") for _ in range(n_dims)]
            ggml_type = cur.scalar("<I")
            offset = cur.scalar("<Q")
            self.tensors[name] = TensorInfo(name, ne, ggml_type, offset)

        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        self.data_start = (cur.pos + alignment - 1) // alignment * alignment

    def get(self, key, default=None):
        return self.metadata.get(key, default)

    def tensor(self, name):
        """The tensor `name` as a float64 array of shape reversed(ne)."""
        info = self.tensors[name]
        start = self.data_start + info.offset
        end = start + info.n_bytes
        if end > len(self.buf):
            raise GgufError(f"{self.path}: tensor {name} runs past the end of the file")
        raw = self.buf[start:end]
        n = info.n_elements
        if info.type == TYPE_F32:
            flat = np.frombuffer(raw, dtype="<f4").astype(np.float64)
        elif info.type == TYPE_F16:
            flat = np.frombuffer(raw, dtype="<f2").astype(np.float64)
        elif info.type == TYPE_BF16:
            # bf16 is the top half of an f32.
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            flat = bits.view("<f4").astype(np.float64)
        elif info.type == TYPE_Q8_0:
            block = np.dtype([("d", "<f2"), ("q", "i1", (Q8_0_BLOCK,))])
            blocks = np.frombuffer(raw, dtype=block)
            flat = (blocks["d"].astype(np.float64)[:, None] * blocks["q"].astype(np.float64)).reshape(-1)
        else:
            raise GgufError(f"{self.path}: tensor {name} has unsupported type {info.type}")
        assert flat.size == n
        return flat.reshape(tuple(reversed(info.ne)))
