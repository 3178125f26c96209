"""`featx serve`: fitted heads and the embedding cache behind one HTTP endpoint (FastAPI + uvicorn).

    options.py   the server's options, checked before anything is loaded
    registry.py  the served heads: loading, picking up rewritten head folders, reloads
    cache.py     embeddings by image sha256: an LRU in memory, optionally backed by a featx store
    engine.py    one extractor per distinct head config, and the micro-batcher that feeds it
    training.py  heads fitted through the service on cached rows, as background jobs
    metrics.py   the Prometheus metrics
    contract.py  the OpenAPI declarations: answer models, the error body, request bodies read by the routes
    app.py       the FastAPI routes;  server.py  binding, start-up and shutdown

Everything here but options.py needs the optional `featx[serve]` extra; `featx --help` imports options.py alone.
"""
