"""server: the OpenAI-compatible HTTP face of the engine (FastAPI). Never touches a tensor.

    tptt-serve --model default --port 8000
"""
