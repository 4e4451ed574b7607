"""The client package imports and works in a process where torch and OpenCV cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_client_works_without_torch_or_opencv(default_server, cat_path):
    server, _ = default_server
    script = textwrap.dedent(f"""
        import sys
        for name in ("torch", "torchvision", "timm", "cv2"):
            sys.modules[name] = None  # any import of these now raises ImportError
        import numpy as np
        import camserve
        from camserve import Client, CamserveError
        from camserve.cli import main
        with Client("127.0.0.1:{server.port}", timeout=60) as client:
            assert client.model_info().name == "efficientnet_lite0"
            assert client.predict({str(cat_path)!r}).best.label
            e = client.explain({str(cat_path)!r})
            assert e.raw.shape == (7, 7) and e.heatmap.shape == (300, 451)
            assert e.overlay().shape == (300, 451, 3)
        assert main(["--target", "127.0.0.1:{server.port}", "info"]) == 0
        loaded = [m for m in ("torch", "cv2", "camserve_server") if sys.modules.get(m)]
        assert not loaded, loaded
        print("client ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "client ok" in done.stdout
