"""r4b-edge benchmarks (installed as r4b_edge.benchmarks)."""
