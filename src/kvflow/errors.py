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


# ---------------- serving: the async engine and the server ----------------
class EngineDeadError(KvflowError, RuntimeError):
    """The engine thread stopped (shutdown or an internal error); no request can run."""


class EngineStepError(KvflowError, RuntimeError):
    """An engine step raised; the requests in flight at that moment were aborted."""


class QueueFullError(KvflowError):
    """Admitting this request would put more sequences in flight than the server allows; retry later."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(QueueFullError):
    """The server is draining before it stops: it admits nothing new (retry on another instance)."""


class RequestAbortedError(KvflowError):
    """The server aborted a request it had admitted (at shutdown, when the drain timeout ran out)."""
