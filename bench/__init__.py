"""Benchmark tools: BEIR rerank workloads, an async load client and its plots (`rerank-gateway bench`)."""
