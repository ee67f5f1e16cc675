"""Callbacks of ptuning-pl; each is built from a `_target_` entry in conf/callbacks/."""

from ptuning_pl.callbacks.hub_push import HubPushCallback
from ptuning_pl.callbacks.monitoring import RunReport, ThroughputLogger
from ptuning_pl.callbacks.resume import ExactResume

__all__ = ["ExactResume", "HubPushCallback", "RunReport", "ThroughputLogger"]
