"""Errors a user can act on. Each message names the adapter, module or file it is about."""


class AdapterError(ValueError):
    """Base class of adapterkit's errors."""


class AdapterConfigError(AdapterError):
    """A method config with an unknown method or values that cannot work."""


class AdapterNotFoundError(AdapterError, KeyError):
    """An adapter name that is not loaded."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterExistsError(AdapterError):
    """`add` or `load` under a name that is already taken."""


class TargetError(AdapterError):
    """Targets that match no module, or a module the method cannot wrap."""


class CompositionError(AdapterError):
    """An activation, merge or routing request that the loaded adapters cannot satisfy."""


class AdapterFileError(AdapterError):
    """A missing, truncated, unsafe or mismatched adapter file."""


class PrecisionError(AdapterError):
    """A dtype, device or quantization that cannot be used here, or a merge into a quantized base
    that does not say how."""
