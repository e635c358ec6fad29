"""Runtime monitors: read a probe, SAE features or a direction on every generated token, and act.

    from mechscope import monitor
    ms = [monitor.ProbeMonitor("deception", probe, threshold=0.0, action="stop"),
          monitor.DirectionMonitor("refusal", "blocks.6.hook_resid_post", v, threshold=2.0, window=3)]
    res = model.generate("prompt", 32, monitors=ms)     # -> MonitoredGeneration
    res.text, res.trace[0].scores, res.alerts, res.stopped_by
    monitor.save_monitors("mon/", ms); ms = monitor.load_monitors("mon/", model)

All monitors read the forward that produces each token (read-only hooks, one per hook point): no second pass.
Step t reads the position that predicts token t (step 0: the prompt's last token), so a "stop" monitor can
block a generation before its first token.
"""

from mechscope.monitor.generation import generate_monitored
from mechscope.monitor.monitors import (
    ACTIONS,
    DirectionMonitor,
    FeatureMonitor,
    FunctionMonitor,
    Monitor,
    ProbeMonitor,
    check_monitors,
)
from mechscope.monitor.runtime import MonitorRun
from mechscope.monitor.trace import Alert, MonitoredGeneration, TokenTrace

__all__ = ["ACTIONS", "Alert", "DirectionMonitor", "FeatureMonitor", "FunctionMonitor", "Monitor",
           "MonitorRun", "MonitoredGeneration", "ProbeMonitor", "TokenTrace", "check_monitors",
           "generate_monitored"]
