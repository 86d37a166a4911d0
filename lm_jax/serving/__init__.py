"""Serving: a continuous-batching engine (`engine`), the thread that drives it (`runner`) and an
OpenAI-compatible HTTP API over it (`openai_api`, `app`; experiments/serve.py)."""
