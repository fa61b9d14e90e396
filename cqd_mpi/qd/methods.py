"""Search methods by name (`qd.method`): CycleQD, the paper's comparisons, or a plug-in.

A method is a `Strategy` (qd/strategy.py) handed to the one search loop (qd/search.py), so
the runtime, the state file, `analyze`, `export` and `compare` treat them alike. A plug-in
is named 'package.module:Class', as task and engine kinds are.
"""

from __future__ import annotations

from cqd_mpi import plugins
from cqd_mpi.errors import ConfigError
from cqd_mpi.qd.strategy import Strategy

BUILTIN = {
    "cycleqd": "cqd_mpi.qd.cycleqd:CycleQD",
    "qd": "cqd_mpi.qd.noncyclic:NonCyclicQD",
    "cma-es": "cqd_mpi.qd.coefficients:CMAES",
    "nsga2": "cqd_mpi.qd.coefficients:NSGA2",
    "policy-gradient": "cqd_mpi.qd.policy_gradient:PolicyGradient",
}


def method_class(name: str, where: str = "qd.method") -> type[Strategy]:
    """The strategy class of a search method: a key of BUILTIN or 'package.module:Class'."""
    return plugins.load_class(name, builtin=BUILTIN, base=Strategy, what="search method", where=where)


def methods_for(k: int) -> list[str]:
    """The built-in methods that make sense with k tasks (`min_tasks`)."""
    return [name for name in BUILTIN if method_class(name).min_tasks <= k]


def check_task_count(method: str, tasks: list[str]) -> None:
    """ConfigError when `method` needs more tasks than the config has (K = 1: nothing to cycle or
    trade off), naming the methods that make sense with that many."""
    needed = method_class(method).min_tasks
    if len(tasks) < needed:
        raise ConfigError(f"qd.method: {method} needs at least {needed} tasks (with fewer there is no other task to "
                          f"cycle or trade off against), got {len(tasks)} ({', '.join(tasks)}); with {len(tasks)} "
                          f"task(s) use {' or '.join(methods_for(len(tasks)))}")


def method_name(strategy: Strategy) -> str:
    """The name that `method_class` turns back into the strategy's class: its built-in name,
    or 'module:Class' for a plug-in (which may inherit a built-in's `method`)."""
    target = f"{type(strategy).__module__}:{type(strategy).__qualname__}"
    return strategy.method if BUILTIN.get(strategy.method) == target else target
