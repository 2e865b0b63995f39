"""Reasoning traces: the format conventions, the offline `Trace` with exact token offsets,
the online `StepTracker`, token-to-step pooling and the step-level hook points."""

from .hookpoints import attach_trace
from .pooling import pool_to_steps
from .trace import Step, Trace, TraceWarning, load_traces
from .tracker import StepEvent, StepTracker, prompt_positions

__all__ = ["Step", "StepEvent", "StepTracker", "Trace", "TraceWarning", "attach_trace", "load_traces", "pool_to_steps",
           "prompt_positions"]
