"""cqd_mpi: CycleQD, quality-diversity merging of expert LLMs, as an MPI batch application."""

__version__ = "0.1.0"
