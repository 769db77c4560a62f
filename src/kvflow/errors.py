"""Exception types. User mistakes raise these with a message naming the field and the limit;
internal invariants use assert."""


class KvflowError(Exception):
    """Base class of every error kvflow raises on purpose."""


class InvalidRequestError(KvflowError, ValueError):
    """A request (prompt or sampling parameters) is invalid. Only that request fails."""


class ModelNotFoundError(KvflowError, FileNotFoundError):
    """The model name or path does not resolve to model files."""


class ModelLoadError(KvflowError, RuntimeError):
    """Model files exist but cannot be read (corrupt, unsupported architecture or tensor type)."""


class ConfigError(KvflowError, ValueError):
    """An engine option is invalid."""
