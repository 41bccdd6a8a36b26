"""r4b-edge train (installed as r4b_edge.train)."""
