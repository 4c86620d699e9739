"""``python -m services.activation_server``: run the Activation Server until SIGTERM or SIGINT."""

from services.activation_server.config import load_settings
from services.activation_server.server import build
from tessera.server.serving import run_service

if __name__ == "__main__":
    run_service(load_settings, build)
