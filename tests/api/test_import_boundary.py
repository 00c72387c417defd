"""The API process never imports TensorFlow: importing it, building the app and serving a request."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT


def test_api_process_does_not_import_tensorflow() -> None:
    # A fresh interpreter: this test process may have imported TF for other tests.
    script = textwrap.dedent(
        """
        import sys
        from fastapi.testclient import TestClient
        import service.api, service.cli, service.tensorcodec
        from service.api import Settings, create_app
        from service.api.settings import Settings
        from tests.api.fakes import FakePool

        app = create_app(Settings(), pool=FakePool())
        app.openapi()
        with TestClient(app) as client:
            r = client.post("/v1/gradient", json={"expression": "sum(x**2)", "variables": {"x": [1.0, 2.0]},
                                                  "derivatives": ["gradient", "hessian"]})
            assert r.status_code == 200, r.text
            assert client.get("/v1/functions").status_code == 200
        Settings(workers=1, devices="cpu").pool_config()
        import service.workers
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
        print(",".join(leaked) or "clean")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
