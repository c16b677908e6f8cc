"""The HTTP API (FastAPI), independent of Ray: `build_api(backend, settings)`.

`backend` is anything with `stream(request) -> async iterator of engine events`,
`complete(request) -> Completion` and `status() -> EngineStatus` (`service.Backend`); in Ray
Serve it wraps the ChatModel deployment handle (see ../app.py). The request (`EngineRequest`:
messages and `RequestParams`), the status and the events (`Start`, `Token`, `Done`, `Error`) are
`selflearn.contracts`' types.

Every answer names the checkpoint that produced it: `checkpoint` in the JSON body (`model` and
`system_fingerprint` on the OpenAI routes) and the `X-Model-Checkpoint` header.

- `app`: `build_api`, the application: routers, error handlers, middleware
- `service`: `ChatService`, what the routes share (admission, generation, the output filter, answers)
- `chat_routes`, `openai_routes`, `feedback_routes`, `ops_routes`: one router per concept
- `responses`: error bodies and SSE framing; `guard`: API key, body cap, request metrics
"""

from .app import build_api

__all__ = ["build_api"]
