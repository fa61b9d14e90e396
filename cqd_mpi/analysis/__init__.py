"""Reading a run for people: snapshots of state.h5, plots, exports of models."""
