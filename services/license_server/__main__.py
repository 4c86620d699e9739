"""``python -m services.license_server``: run the License Server until SIGTERM or SIGINT."""

from services.license_server.config import load_settings
from services.license_server.server import build
from tessera.server.serving import run_service

if __name__ == "__main__":
    run_service(load_settings, build)
