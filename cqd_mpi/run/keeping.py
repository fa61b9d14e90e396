"""Which models' weights the run keeps, and where: the model store's decision (run/store.py acts
on it), and state.h5's `saved` and `path` columns, which record it.

The search says which models are live (`Search.live_models`: archive members and the inputs
of pending jobs) and which are final; this module alone turns that into storage:

- the base and the experts are kept where the user keeps them (unless dropped as lost);
- a child is written to models/<id> when it enters an archive, and kept while it is live;
- the final model (kind aggregate) is written to final/ once it is told;
- the naive average and the candidates of the coefficient searches are never written (a
  recipe over the experts rebuilds them in one merge).

"Kept" says that the run keeps a model, not that its bytes are on disk: beyond
`runtime.model_store_bytes` the store evicts kept children and rebuilds them on demand, and
the state file is the same either way.
"""

from __future__ import annotations

from cqd_mpi.qd.records import ModelKind, ModelRecord, Phase
from cqd_mpi.qd.search import Search
from cqd_mpi.run.rundir import FINAL, MODELS


def written(core: Search) -> set[int]:
    """The children ever written to models/<id>: those that entered an archive."""
    return {int(row.child_id) for row in core.history
            if row.entered.any() and core.models[row.child_id].kind == ModelKind.CHILD}


def kept(core: Search) -> list[bool]:
    """Per model: whether the run keeps its weights now (state.h5's `saved` column)."""
    live = core.live_models()
    dropped = {m for _, m in core.dropped}
    children = written(core)
    pending = {job.model_id for job in core.pending}
    out = []
    for record in core.models:
        m = record.id
        if record.kind in (ModelKind.BASE, ModelKind.EXPERT):
            out.append(m not in dropped)
        elif record.kind == ModelKind.CHILD:
            out.append(m in children and m in live and m not in dropped)
        elif record.kind == ModelKind.AGGREGATE:
            out.append(core.phase in (Phase.FINAL, Phase.DONE) and m not in pending)
        else:
            out.append(False)
    return out


def stored_path(record: ModelRecord, children: set[int]) -> str:
    """Where the run keeps a model's weights (state.h5's `path` column, relative to RUN_DIR):
    the user's dir for the base and the experts, models/<id> for a child in `children`
    (`written`; whether or not it is still kept), final for the final model, "" otherwise."""
    if record.kind in (ModelKind.BASE, ModelKind.EXPERT):
        return record.source
    if record.kind == ModelKind.CHILD and record.id in children:
        return f"{MODELS}/{record.id}"
    if record.kind == ModelKind.AGGREGATE:
        return FINAL
    return ""


def paths(core: Search) -> list[str]:
    children = written(core)
    return [stored_path(r, children) for r in core.models]
