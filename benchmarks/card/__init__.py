"""The model-card reports: ONNX and GGUF exports against torch on the held-out eval items
(onnx_report, quant_eval, parity_report, gpu_parity), the example pair (pick_examples) and
`remake`, which re-makes every artefact describing a model (installed as r4b_edge.benchmarks.card)."""
