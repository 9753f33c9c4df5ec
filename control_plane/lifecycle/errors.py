"""Why a request for a launched model could not be served (lifecycle/manager.py); the activator and the admin
API map `code` to the client's error."""

from __future__ import annotations


class LifecycleError(Exception):
    """Why a request for a launched model could not be served; `code` is the client's error code."""

    code = "model_unavailable"


class LoadingTimeout(LifecycleError):
    code = "model_loading_timeout"


class LoadFailed(LifecycleError):
    code = "model_load_failed"


class DoesNotFit(LoadFailed):
    code = "model_does_not_fit"
