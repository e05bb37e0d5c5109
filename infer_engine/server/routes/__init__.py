"""The server's endpoints, one module each (as lmdeploy/serve/openai/endpoints/ has them); each
module's `router` is included by `create_app`, and reads the server through `server_of`."""
from . import chat, completions, health, models

ROUTERS = [models.router, health.router, chat.router, completions.router]
