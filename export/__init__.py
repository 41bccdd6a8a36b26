"""r4b-edge export (installed as r4b_edge.export)."""
