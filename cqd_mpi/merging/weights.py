"""Memory-mapped safetensors model directories in, streamed Hugging Face directories out.

One import point for the four modules that do it, each by concern:

- checkpoint.py: safetensors headers (`SafetensorsFile`, `TensorSpec`, the dtypes) and which
  files of a model dir are weights (`non_weight_files`);
- mapped.py: `MappedFile` and `TensorReader`, tensors of one or more models read together in
  bounded resident memory (pages dropped with `MADV_DONTNEED` once consumed);
- modeldir.py: `ModelDir`, a validated HF directory, and `check_compatible`;
- writer.py: `TensorStream`, `write_hf_dir` and `write_safetensors`, written chunk by chunk at
  final offsets, atomically.
"""

from cqd_mpi.merging.checkpoint import (
    DTYPE_NAMES,
    DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsFile,
    TensorSpec,
    non_weight_files,
)
from cqd_mpi.merging.mapped import MappedFile, TensorReader
from cqd_mpi.merging.modeldir import ModelDir, check_compatible
from cqd_mpi.merging.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    TensorPiece,
    TensorStream,
    parse_size,
    write_hf_dir,
    write_safetensors,
)

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "DTYPES", "DTYPE_NAMES", "INDEX_FILE", "SINGLE_FILE", "MappedFile", "ModelDir",
           "SafetensorsFile", "TensorPiece", "TensorReader", "TensorSpec", "TensorStream", "check_compatible",
           "non_weight_files", "parse_size", "write_hf_dir", "write_safetensors"]
