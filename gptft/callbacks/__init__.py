"""Lightning callbacks that measure. A callback with a `metrics()` method has its numbers gathered into
the run's metrics.json by RunRecord."""

from gptft.callbacks.checkpoint import StepCheckpoint
from gptft.callbacks.exact_match import ExactMatch
from gptft.callbacks.memory import PeakMemory
from gptft.callbacks.probes import Probes
from gptft.callbacks.record import RunRecord
from gptft.callbacks.reference import ReferenceProbe
from gptft.callbacks.safe_stop import SafeStop
from gptft.callbacks.throughput import Throughput
from gptft.callbacks.weight_delta import WeightDelta

__all__ = ["ExactMatch", "PeakMemory", "Probes", "ReferenceProbe", "RunRecord", "SafeStop", "StepCheckpoint", "Throughput", "WeightDelta"]
