"""What an operator sees: logs (logs.py), Prometheus metrics (metrics.py,
runs.py), the per-request access log and HTTP metrics (http.py) and the
health probes (probes.py). See docs/operations.md."""
