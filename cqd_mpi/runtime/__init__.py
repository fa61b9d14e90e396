"""Runtimes that drive the CycleQD core: the conductor (rank 0), evaluation groups, MPI workers."""
