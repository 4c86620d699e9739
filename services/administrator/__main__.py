"""``python -m services.administrator``: run the Administrator until SIGTERM or SIGINT."""

from services.administrator.config import load_settings
from services.administrator.server import build
from tessera.server.serving import run_service

if __name__ == "__main__":
    run_service(load_settings, build)
