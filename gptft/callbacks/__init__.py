"""Lightning callbacks that measure. A callback with a `metrics()` method has its numbers gathered into
the run's metrics.json by RunRecord."""

from gptft.callbacks.probes import Probes
from gptft.callbacks.record import RunRecord
from gptft.callbacks.safe_stop import SafeStop
from gptft.callbacks.throughput import Throughput
from gptft.callbacks.weight_delta import WeightDelta

__all__ = ["Probes", "RunRecord", "SafeStop", "Throughput", "WeightDelta"]
