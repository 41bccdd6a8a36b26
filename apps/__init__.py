"""r4b-edge apps (installed as r4b_edge.apps)."""
