"""The operator's tools: what `mtaq exporter`, `mtaq health` and `mtaq queue` read and serve (the
metrics listener, the status page, the queue views, the health checks). Only the command line uses
them, so they live under it, not in common/."""
