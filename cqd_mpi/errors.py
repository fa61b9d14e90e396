"""Exceptions that carry a message meant for the user: what was expected, what came instead."""


class CqdError(Exception):
    """Base class; the CLI prints these without a traceback and exits with status 2."""


class ConfigError(CqdError):
    """A config key is unknown, of the wrong type, or points at something missing."""


class WeightsError(CqdError):
    """A checkpoint directory is unreadable or does not match the base model."""


class StateError(CqdError):
    """The run directory or state.h5 cannot be used as asked."""


class TaskError(CqdError):
    """A task's data or settings are unusable."""


class BackendUnavailable(CqdError):
    """An evaluation back-end (sandbox, database server, container engine) cannot be reached."""


class MissingDependency(CqdError):
    """An optional package is needed for this feature; the message names the pip extra."""


def require(module: str, *, extra: str, feature: str):
    """Import an optional module, or raise MissingDependency naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"{feature} needs the Python package '{module.split('.')[0]}', which is not installed "
            f"({exc}). Install it with: pip install 'cqd_mpi[{extra}]'"
        ) from exc
