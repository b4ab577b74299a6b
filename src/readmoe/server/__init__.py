"""Front ends over ``serve.engine``: an OpenAI-compatible HTTP server and the terminal.

One job per module: ``config`` (the server's settings), ``protocol`` (request bodies and the
replies' JSON), ``errors`` (OpenAI-shaped error bodies), ``text`` (incremental
detokenisation with stop strings), ``prompts`` (chat templates, prompt and context checks),
``bridge`` (the engine loop thread and its asyncio side), ``metrics`` (Prometheus),
``routes`` (the OpenAI endpoints), ``app`` (the FastAPI app: auth, health, metrics, errors),
``run`` (uvicorn, signals, graceful shutdown), ``terminal`` (`generate` and `chat`) and
``http_bench`` (`bench serve --endpoint`: a workload replayed over HTTP).
"""
