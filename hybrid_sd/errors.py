"""Errors the serving layer maps to gRPC status codes (see hybrid_sd.rpc_server.status_for)."""


class IncompatibleModelsError(ValueError):
    """Two models that cannot hand over to each other (FAILED_PRECONDITION)."""


class DeadlineExceededError(Exception):
    """The request's deadline passed; raised between denoising steps (DEADLINE_EXCEEDED)."""


class RunCancelledError(Exception):
    """The caller cancelled the request; raised between denoising steps (CANCELLED)."""


class CloudUnavailableError(Exception):
    """The cloud denoiser could not be reached (UNAVAILABLE, or an edge fallback)."""


class QueueFullError(Exception):
    """Too many requests are waiting for a denoiser (RESOURCE_EXHAUSTED)."""


class NonFiniteLatentsError(RuntimeError):
    """The latents became NaN or Inf at a denoising step (INTERNAL): no image is made from them."""


class NotReadyError(Exception):
    """The server is still loading its model (UNAVAILABLE)."""
