"""OpenAI-compatible server: ``nvila serve`` (FastAPI + uvicorn). See nvila.serve.app."""
