"""An OpenAI-compatible server with continuous batching: `python -m neva_jax.serve`.

Modules: `protocol` (the wire format), `images` (image_url sources and limits),
`chat` (messages -> template -> ids; ids -> streamed text), `engine` (the scheduler),
`runner` (the KV-cache slots and compiled programs), `metrics`, `app` (FastAPI),
`static/` (the chat page).
"""
