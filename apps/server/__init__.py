"""The OpenAI-compatible server behind `r4b-edge serve` (apps/serve.py is the verb): the FastAPI app
(app.py), the HTTP layer (http.py: connection limits, timeouts), request parsing and checks
(request.py), access policy (security.py), the one model worker and its queue (worker.py), and
logprobs in the OpenAI shape (logprobs.py). Imported only when the server runs (fastapi, uvicorn)."""
