"""The QD algorithm: archives, the draws of CycleQD, and its ask/tell loop. Knows nothing of processes, files or weights."""
